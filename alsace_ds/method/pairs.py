"""ALSACE stage 2: cross-lingual self-distillation loss over (student|teacher, teacher) pairs.

Pure tensor code (no ``torch.distributed``): functions return the SUM of KL terms and the
NUMBER of terms, so a caller can all-reduce both and divide once for an exact global mean.

Inputs are ``log_probs`` ``[B, T, C]``: log-softmax label distributions of B examples in each
of the T languages. One forward per view serves every pair: all pairs are gathered from these
shared distributions with index tensors. (The authors' code runs TWO forwards per pair; for
XNLI with 15 languages and 7 teachers that is 154 forwards per example instead of 15, for the
same loss up to dropout noise.)

Options (defaults first):

- ``pairs="ordered"`` (paper Eq. 4): every ordered pair (t1, t2) with t2 a teacher and
  t1 != t2, so a teacher-teacher pair appears in both directions and student-student pairs
  never occur. ``pairs="unordered"`` (the authors' code, ``itertools.combinations`` over the
  teacher list plus one student, deduplicated): every unordered pair with at least one
  teacher, once; the teacher side t2 is the pair's EARLIER teacher in ``languages`` order,
  so a student is always t1 and a teacher-teacher pair (a, b), a before b, gives
  KL(P_b || P_a). (The authors order by their hard-coded language ranking; list
  ``languages`` in that order to reproduce their directions.)
- ``direction="forward"`` (paper Eq. 5): KL(P_t1 || P_t2) = sum_c P_t1 (log P_t1 - log P_t2).
  ``"reverse"``: KL(P_t2 || P_t1). The authors' ``KLDivLoss(log_softmax(l1),
  log_softmax(l2), log_target=True)`` on the pair (a, b) computes KL(P_b || P_a), i.e.
  "forward" here with their (earlier = teacher side) convention.
- ``detach_teacher=False`` (the authors' code): gradients flow through both sides.
  ``True`` stops gradients through the t2 (teacher) side; the value is unchanged.
- ``view_mask`` ``[B, T]`` bool: a term counts only if both of its views are valid (padding,
  views held by other ranks). Masked views are replaced by a constant before any arithmetic,
  so garbage (even NaN) in them reaches neither the value nor the gradients.

The loss is computed in float32 at least (bf16/fp16 inputs are upcast). Valid views must have
finite log-probabilities (log-softmax of finite logits always is); a ``-inf`` entry would give
``0 * inf = NaN`` as in ``torch.nn.KLDivLoss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from itertools import combinations
from typing import Literal

import torch
from torch import Tensor

from alsace_ds.method.selection import check_languages

PairMode = Literal["ordered", "unordered"]
Direction = Literal["forward", "reverse"]


def _language_index(
    languages: Sequence[str], teachers: Sequence[str]
) -> tuple[dict[str, int], set[int]]:
    """Validate and map codes to indices: (lang -> index, set of teacher indices)."""
    langs = check_languages(languages)
    teacher_list = list(teachers)
    if not teacher_list:
        raise ValueError("the teacher list is empty")
    dup_t = sorted({t for t in teacher_list if teacher_list.count(t) > 1})
    if dup_t:
        raise ValueError(f"duplicate teachers: {dup_t}")
    index = {lang: i for i, lang in enumerate(langs)}
    unknown = [t for t in teacher_list if t not in index]
    if unknown:
        raise ValueError(f"teacher(s) {unknown} not in languages {langs}")
    return index, {index[t] for t in teacher_list}


def build_pairs(
    languages: Sequence[str], teachers: Sequence[str], pairs: PairMode = "ordered"
) -> list[tuple[int, int]]:
    """Index pairs (t1, t2) into ``languages``; t2 is always a teacher (the distillation target).

    "ordered": all (t1, t2) with t2 a teacher and t1 != t2, sorted by (t1, t2).
    "unordered": each {a, b} (a before b) with at least one teacher once, in
    ``itertools.combinations`` order; t2 is the earlier teacher of the pair, t1 the other.
    Example: languages [en, a, b, c], teachers [en, b] ->
    ordered [(0,2), (1,0), (1,2), (2,0), (3,0), (3,2)];
    unordered [(1,0), (2,0), (3,0), (1,2), (3,2)].
    """
    index, teacher_idx = _language_index(languages, teachers)
    num = len(index)
    if pairs == "ordered":
        return [
            (t1, t2) for t1 in range(num) for t2 in range(num) if t2 in teacher_idx and t1 != t2
        ]
    if pairs == "unordered":
        out = []
        for a, b in combinations(range(num), 2):
            if a in teacher_idx:
                out.append((b, a))
            elif b in teacher_idx:
                out.append((a, b))
        return out
    raise ValueError(f"pairs must be 'ordered' or 'unordered', got {pairs!r}")


@lru_cache(maxsize=64)
def _cached_pairs(
    languages: tuple[str, ...], teachers: tuple[str, ...], pairs: PairMode
) -> tuple[tuple[int, int], ...]:
    """``build_pairs`` memoised per (languages, teachers, mode): a training step does no
    Python work over pairs, only one small host-to-device copy of the index."""
    return tuple(build_pairs(languages, teachers, pairs))


def _pair_index(
    languages: Sequence[str], teachers: Sequence[str], pairs: PairMode, device: torch.device
) -> tuple[Tensor, Tensor]:
    """(t1, t2) ``[P]`` long index tensors for the pair set."""
    pair_list = _cached_pairs(tuple(languages), tuple(teachers), pairs)
    idx = torch.tensor(pair_list, dtype=torch.long).reshape(-1, 2).to(device)  # [P, 2]
    return idx[:, 0], idx[:, 1]


def _prepare(log_probs: Tensor, num_languages: int, view_mask: Tensor | None) -> Tensor:
    """Validate, upcast to >= float32 and blank masked views. ``[B, T, C]`` -> ``[B, T, C]``."""
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must have shape [B, T, C], got {list(log_probs.shape)}")
    if log_probs.shape[1] != num_languages:
        raise ValueError(
            f"log_probs has {log_probs.shape[1]} languages but {num_languages} codes were given"
        )
    if log_probs.dtype in (torch.float16, torch.bfloat16):
        log_probs = log_probs.float()
    if view_mask is None:
        return log_probs
    if view_mask.shape != log_probs.shape[:2] or view_mask.dtype != torch.bool:
        raise ValueError(
            f"view_mask must be bool of shape {list(log_probs.shape[:2])}, "
            f"got {view_mask.dtype} {list(view_mask.shape)}"
        )
    # A constant log-distribution (zeros) keeps masked entries finite and gradient-free.
    return torch.where(view_mask.unsqueeze(-1), log_probs, torch.zeros_like(log_probs))


def pair_kl_terms(
    log_probs: Tensor,
    languages: Sequence[str],
    teachers: Sequence[str],
    *,
    pairs: PairMode = "ordered",
    direction: Direction = "forward",
    detach_teacher: bool = False,
    view_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum of KL terms, number of terms), both 0-dim tensors on ``log_probs.device``.

    ``log_probs`` ``[B, T, C]`` log-softmax outputs, one forward per view. A term is one
    (example, pair); with ``view_mask`` ``[B, T]`` it counts only if both views are valid.
    The sum is float32 (float64 if the input is float64); the count is int64.
    See the module docstring for ``pairs``, ``direction`` and ``detach_teacher``.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    lp = _prepare(log_probs, len(languages), view_mask)  # [B, T, C]
    t1, t2 = _pair_index(languages, teachers, pairs, lp.device)  # [P], [P]
    lp_student = lp[:, t1]  # [B, P, C]
    lp_teacher = lp[:, t2]  # [B, P, C]
    if detach_teacher:
        lp_teacher = lp_teacher.detach()
    if direction == "forward":  # KL(P_t1 || P_t2)
        kl = (lp_student.exp() * (lp_student - lp_teacher)).sum(-1)  # [B, P]
    else:  # KL(P_t2 || P_t1)
        kl = (lp_teacher.exp() * (lp_teacher - lp_student)).sum(-1)  # [B, P]
    if view_mask is None:
        count = torch.tensor(kl.numel(), dtype=torch.int64, device=lp.device)
        return kl.sum(), count
    valid = view_mask[:, t1] & view_mask[:, t2]  # [B, P]
    total = torch.where(valid, kl, torch.zeros_like(kl)).sum()
    return total, valid.sum()


def pair_kl_loss(
    log_probs: Tensor,
    languages: Sequence[str],
    teachers: Sequence[str],
    *,
    pairs: PairMode = "ordered",
    direction: Direction = "forward",
    detach_teacher: bool = False,
    view_mask: Tensor | None = None,
) -> Tensor:
    """Mean KL over all (example, pair) terms: ``sum / count`` (paper Eq. 5 with 1/|Xhat|).

    When there is no term (a single language, or everything masked) the result is a zero that
    is still connected to ``log_probs`` (the empty/masked sum divided by max(count, 1)), so
    ``backward()`` works and yields zero gradients; no host synchronisation is needed.
    For a global mean over ranks, all-reduce ``pair_kl_terms`` instead.
    """
    total, count = pair_kl_terms(
        log_probs,
        languages,
        teachers,
        pairs=pairs,
        direction=direction,
        detach_teacher=detach_teacher,
        view_mask=view_mask,
    )
    return total / count.clamp(min=1).to(total.dtype)
