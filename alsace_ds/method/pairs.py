"""ALSACE stage 2: cross-lingual self-distillation loss over (student|teacher, teacher) pairs.

Pure tensor code (no ``torch.distributed``). Inputs are ``log_probs`` ``[B, T, C]``:
log-softmax label distributions of B examples in each of the T languages. One forward per
view serves every pair: all pairs are gathered from these shared distributions with index
tensors. (The authors' code runs TWO forwards per pair; for XNLI with 15 languages and 7
teachers that is 154 forwards per example instead of 15, for the same loss up to dropout
noise.)

Options (defaults first). Pair policies and directions are registries
(:data:`PAIR_POLICIES`, :data:`DIRECTIONS`): a new one is one function and one entry.

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
- ``pairs="teachers_only"`` (the paper's "excluding weak languages from the students"
  ablation, our exact definition): every ordered pair (t1, t2) with BOTH t1 and t2 teachers,
  t1 != t2. The weak languages (the selection's students) get no loss at all; they move only
  through the shared weights. With fewer than 2 teachers there is no pair and the loss is a
  connected zero.
- ``detach_teacher=False`` (the authors' code): gradients flow through both sides.
  ``True`` stops gradients through the t2 (teacher) side; the value is unchanged.
- ``students_teach=True``: as the pairs say. ``False`` (the paper's "excluding weak languages
  from the teachers" ablation, our exact definition) stops gradients through the t2
  (teacher) side of every pair whose t1 is a student: a weak language learns from the
  teachers, but no gradient from a weak language's distribution ever reaches a teacher.
  Teacher-teacher pairs are unchanged, and so is the loss value; only gradients differ.

The loss is computed in float32 at least (bf16/fp16 inputs are upcast). Log-probabilities
must be finite (log-softmax of finite logits always is); a ``-inf`` entry would give
``0 * inf = NaN`` as in ``torch.nn.KLDivLoss``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import combinations

import torch
from torch import Tensor

from alsace_ds.method.selection import check_languages

#: A pair policy: (number of languages T, teacher indices) -> the (t1, t2) index pairs, t2
#: always a teacher (the distillation target).
PairPolicy = Callable[[int, set[int]], list[tuple[int, int]]]

#: A KL direction: (log P_t1, log P_t2), both ``[B, P, C]`` -> one KL term per pair ``[B, P]``.
KLDirection = Callable[[Tensor, Tensor], Tensor]


def ordered_pairs(num: int, teachers: set[int]) -> list[tuple[int, int]]:
    """Paper Eq. 4: all (t1, t2) with t2 a teacher and t1 != t2, sorted by (t1, t2)."""
    return [(t1, t2) for t1 in range(num) for t2 in range(num) if t2 in teachers and t1 != t2]


def unordered_pairs(num: int, teachers: set[int]) -> list[tuple[int, int]]:
    """The authors' code: each {a, b} (a before b) with at least one teacher once, in
    ``itertools.combinations`` order; t2 is the earlier teacher of the pair, t1 the other."""
    out = []
    for a, b in combinations(range(num), 2):
        if a in teachers:
            out.append((b, a))
        elif b in teachers:
            out.append((a, b))
    return out


def teacher_pairs(num: int, teachers: set[int]) -> list[tuple[int, int]]:
    """Excluding weak languages from the students: all (t1, t2) with BOTH teachers and
    t1 != t2, sorted by (t1, t2); empty with fewer than 2 teachers."""
    return [(t1, t2) for t1, t2 in ordered_pairs(num, teachers) if t1 in teachers]


PAIR_POLICIES: dict[str, PairPolicy] = {
    "ordered": ordered_pairs,
    "unordered": unordered_pairs,
    "teachers_only": teacher_pairs,
}


def forward_kl(lp1: Tensor, lp2: Tensor) -> Tensor:
    """KL(P_t1 || P_t2) = sum_c P_t1 (log P_t1 - log P_t2): ``[B, P, C]`` x2 -> ``[B, P]``."""
    return (lp1.exp() * (lp1 - lp2)).sum(-1)


def reverse_kl(lp1: Tensor, lp2: Tensor) -> Tensor:
    """KL(P_t2 || P_t1): ``[B, P, C]`` x2 -> ``[B, P]``."""
    return forward_kl(lp2, lp1)


DIRECTIONS: dict[str, KLDirection] = {"forward": forward_kl, "reverse": reverse_kl}


def _choices(registry: dict) -> str:
    return " or ".join(repr(name) for name in registry)


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
    languages: Sequence[str], teachers: Sequence[str], pairs: str = "ordered"
) -> list[tuple[int, int]]:
    """Index pairs (t1, t2) into ``languages`` under the policy ``PAIR_POLICIES[pairs]``;
    t2 is always a teacher (the distillation target).

    Example: languages [en, a, b, c], teachers [en, b] ->
    ordered [(0,2), (1,0), (1,2), (2,0), (3,0), (3,2)];
    unordered [(1,0), (2,0), (3,0), (1,2), (3,2)].
    """
    index, teacher_idx = _language_index(languages, teachers)
    if pairs not in PAIR_POLICIES:
        raise ValueError(f"pairs must be {_choices(PAIR_POLICIES)}, got {pairs!r}")
    return PAIR_POLICIES[pairs](len(index), teacher_idx)


@lru_cache(maxsize=64)
def _cached_pairs(
    languages: tuple[str, ...], teachers: tuple[str, ...], pairs: str
) -> tuple[tuple[int, int, bool], ...]:
    """``build_pairs`` memoised per (languages, teachers, policy), each pair with whether its
    t1 is a student: a training step does no Python work over pairs."""
    teacher_set = set(teachers)
    return tuple(
        (t1, t2, languages[t1] not in teacher_set)
        for t1, t2 in build_pairs(languages, teachers, pairs)
    )


@lru_cache(maxsize=64)
def _pair_index(
    languages: tuple[str, ...], teachers: tuple[str, ...], pairs: str, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """(t1, t2) ``[P]`` long index tensors for the pair set, and ``[P]`` bool: t1 a student;
    memoised per device too, so a training step makes no host-to-device copy at all."""
    pair_list = _cached_pairs(languages, teachers, pairs)
    idx = torch.tensor(pair_list, dtype=torch.long).reshape(-1, 3).to(device)  # [P, 3]
    return idx[:, 0], idx[:, 1], idx[:, 2].bool()


def _prepare(log_probs: Tensor, num_languages: int) -> Tensor:
    """Validate and upcast to >= float32. ``[B, T, C]`` -> ``[B, T, C]``."""
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must have shape [B, T, C], got {list(log_probs.shape)}")
    if log_probs.shape[1] != num_languages:
        raise ValueError(
            f"log_probs has {log_probs.shape[1]} languages but {num_languages} codes were given"
        )
    if log_probs.dtype in (torch.float16, torch.bfloat16):
        return log_probs.float()
    return log_probs


def pair_kl_loss(
    log_probs: Tensor,
    languages: Sequence[str],
    teachers: Sequence[str],
    *,
    pairs: str = "ordered",
    direction: str = "forward",
    detach_teacher: bool = False,
    students_teach: bool = True,
) -> Tensor:
    """Mean KL over all B x P (example, pair) terms (paper Eq. 5 with 1/|Xhat|), 0-dim.

    ``log_probs`` ``[B, T, C]`` log-softmax outputs, one forward per view. The result is
    float32 (float64 if the input is float64). With no pair at all (a single language) it is
    a zero still connected to ``log_probs``, so ``backward()`` works and gives zero gradients.
    See the module docstring for ``pairs``, ``direction``, ``detach_teacher`` and
    ``students_teach``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be {_choices(DIRECTIONS)}, got {direction!r}")
    lp = _prepare(log_probs, len(languages))  # [B, T, C]
    t1, t2, student_t1 = _pair_index(tuple(languages), tuple(teachers), pairs, lp.device)
    lp_teacher = lp[:, t2]  # [B, P, C]
    if detach_teacher:
        lp_teacher = lp_teacher.detach()
    elif not students_teach:  # the teacher side of (student, teacher) pairs takes no gradient
        lp_teacher = torch.where(student_t1[None, :, None], lp_teacher.detach(), lp_teacher)
    kl = DIRECTIONS[direction](lp[:, t1], lp_teacher)  # [B, P]
    return kl.sum() / max(kl.numel(), 1)
