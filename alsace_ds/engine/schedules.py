"""Learning-rate schedules, and how far a schedule can move the weights under Adam.

Pure arithmetic, no torch. Adam's update of a weight at step k is ``lr_k * m_k / (sqrt(v_k) +
eps)``, whose size is about ``lr_k`` whatever the gradient's scale (exactly ``lr_0`` at the
first step); so the most a weight can travel in a stage is about the SUM of the per-step
learning rates, ``lr_sum``. Two schedules are the same update only when these sums are (the
loss's scale does not matter under Adam; the number of steps does). That is why a learning
rate does not transfer by value from the authors' code, whose optimizer steps are pair items
(``authors_*`` below), to ours, whose steps are batches of parallel examples with every pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SCHEDULES = ("linear", "constant")


def lr_factor(kind: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based, the one
    ``LambdaLR`` applies): linear warm-up to 1 over ``warmup_steps``, then ``linear``: linear
    decay to 0 at ``total_steps``; ``constant``: 1 (DeepSpeed's WarmupLR, the authors')."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        return max(0.0, (total_steps - step) / span)

    return factor


def lr_sum(kind: str, total_steps: int, warmup_steps: int, lr: float) -> float:
    """Sum of the learning rates of the ``total_steps`` optimizer steps of a stage."""
    factor = lr_factor(kind, total_steps, warmup_steps)
    return lr * math.fsum(factor(s) for s in range(total_steps))


def warmup_steps(total_steps: int, ratio: float) -> int:
    """Our warm-up length (``int(ratio * total)``, as the trainer computes it)."""
    return int(ratio * total_steps)


# ----------------------------------------------------------------------------- the authors' recipe

#: run_script/distillation.sh of pkunlp-icler/ALSACE: ``bs=40`` pair items per step on one
#: process (``python run.py``, no launcher), ``epoch=100``, ``lr=3e-8``, ``--warmup_ratio 0.2``
#: with deepspeed.json's ``WarmupLR`` scheduler (DeepSpeed's default log warm-up, then constant).
AUTHORS_BATCH = 40
AUTHORS_EPOCHS = 100
AUTHORS_LR = 3e-8
AUTHORS_WARMUP_RATIO = 0.2
AUTHORS_EXAMPLES = 500  # "500-shot unlabeled multilingual data" (paper, appendix A.1)


def authors_pairs(num_languages: int, num_teachers: int) -> int:
    """Unordered language pairs of the authors' pair set (``ensemble_lang_connect``): every
    teacher-teacher pair once, plus every (teacher, student) pair:
    ``C(k, 2) + k * (T - k)``. XNLI with 7 teachers: 21 + 7 * 8 = 77."""
    k, t = num_teachers, num_languages
    if not 0 < k <= t:
        raise ValueError(f"need 0 < teachers <= languages, got {k} of {t}")
    return k * (k - 1) // 2 + k * (t - k)


def authors_steps(num_examples: int, num_pairs: int) -> int:
    """Optimizer steps of the authors' run: every (example, pair) is one item, ``AUTHORS_BATCH``
    items per step, ``AUTHORS_EPOCHS`` epochs (HF Trainer: ceil per epoch, no drop_last)."""
    return AUTHORS_EPOCHS * math.ceil(num_examples * num_pairs / AUTHORS_BATCH)


def deepspeed_warmup_lr_sum(total_steps: int, warmup_ratio: float, lr: float) -> float:
    """Sum of the learning rates that DeepSpeed's ``WarmupLR`` (warmup_type ``log``, min 0,
    max ``lr``) hands the optimizer over ``total_steps`` steps, with HF Trainer's
    ``warmup_num_steps = ceil(ratio * total)``. Its first step runs at the min lr (0); step
    ``k >= 1`` at ``lr * log(k) / log(warmup)`` during warm-up, then ``lr``."""
    warm = max(2, math.ceil(warmup_ratio * total_steps))  # WarmupLR's own floor of 2
    inv = 1.0 / math.log(warm)
    gammas = (inv * math.log(j + 1) if j < warm else 1.0 for j in range(total_steps - 1))
    return lr * math.fsum(gammas)


@dataclass(frozen=True)
class AuthorsUpdate:
    """The authors' stage 2 for one pair set: their steps and their learning-rate sum."""

    num_languages: int
    num_teachers: int
    num_examples: int
    pairs: int
    steps: int
    lr: float
    lr_sum: float


def authors_update(
    num_languages: int, num_teachers: int, num_examples: int = AUTHORS_EXAMPLES
) -> AuthorsUpdate:
    pairs = authors_pairs(num_languages, num_teachers)
    steps = authors_steps(num_examples, pairs)
    total = deepspeed_warmup_lr_sum(steps, AUTHORS_WARMUP_RATIO, AUTHORS_LR)
    return AuthorsUpdate(num_languages, num_teachers, num_examples, pairs, steps, AUTHORS_LR, total)


def matching_lr(target_sum: float, kind: str, total_steps: int, warmup_ratio: float) -> float:
    """The peak lr whose ``lr_sum`` over our schedule equals ``target_sum``."""
    return target_sum / lr_sum(kind, total_steps, warmup_steps(total_steps, warmup_ratio), 1.0)
