"""Learning-rate sums, the authors' stage-2 recipe, and the presets' re-derived schedules."""

from __future__ import annotations

import math
import re

import pytest
import torch

from alsace_ds.config import config_path, load_config, preset_names
from alsace_ds.engine.schedules import (
    authors_pairs,
    authors_steps,
    authors_update,
    deepspeed_warmup_lr_sum,
    lr_factor,
    lr_sum,
    matching_lr,
    warmup_steps,
)
from alsace_ds.engine.trainer import plan_steps


def test_lr_factor_shapes():
    lin = lr_factor("linear", total_steps=10, warmup_steps=2)
    assert [round(lin(s), 3) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]
    const = lr_factor("constant", total_steps=10, warmup_steps=4)
    assert [const(s) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor("cosine", 10, 0)


def test_lr_sum_is_what_torch_applies():
    """Sum of the learning rates LambdaLR really hands AdamW, step by step."""
    for kind, total, warm in (("linear", 17, 3), ("constant", 23, 5), ("linear", 5, 0)):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=2e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(kind, total, warm))
        seen = 0.0
        for _ in range(total):
            seen += opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
        assert lr_sum(kind, total, warm, 2e-3) == pytest.approx(seen, rel=1e-12)


def test_deepspeed_warmup_lr_sum_equals_the_real_scheduler():
    """Our closed form against DeepSpeed's own WarmupLR (log warm-up), as the authors ran it
    (warmup_num_steps = ceil(0.2 x total), HF Trainer's get_warmup_steps)."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    total, lr = 400, 3e-8
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    sched = WarmupLR(opt, warmup_min_lr=0.0, warmup_max_lr=lr,
                     warmup_num_steps=math.ceil(0.2 * total), warmup_type="log")  # fmt: skip
    seen = 0.0
    for _ in range(total):  # what each optimizer step runs at, then the engine's sched.step()
        seen += opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert deepspeed_warmup_lr_sum(total, 0.2, lr) == pytest.approx(seen, rel=1e-12)


def test_authors_xnli_count():
    # run_script/distillation.sh: 15 languages, ensemble_weak_number 8 -> 7 teachers.
    assert authors_pairs(15, 7) == 21 + 7 * 8 == 77
    assert authors_steps(500, 77) == 100 * 963  # ceil(500 * 77 / 40) per epoch
    a = authors_update(15, 7)
    assert a.steps == 96_300 and a.lr == 3e-8
    assert a.lr_sum == pytest.approx(2.830e-3, rel=1e-3)
    # the old presets' schedule (2 epochs of 16 steps at 3e-8, linear decay) was ~6,000x less
    ours_before = lr_sum("linear", 32, 0, 3e-8)
    assert a.lr_sum / ours_before > 5000


def test_matching_lr_inverts_lr_sum():
    lr = matching_lr(2.83e-3, "constant", 1600, 0.2)
    assert lr_sum("constant", 1600, warmup_steps(1600, 0.2), lr) == pytest.approx(2.83e-3)


# What the authors' code builds per task (see the presets' comments): languages, teachers.
AUTHORS_PAIR_SETS = {"xnli": (15, 7), "pawsx": (7, 2), "xcopa": (11, 5)}
UNLABELED = {"xnli": 500, "pawsx": 500, "xcopa": 100}  # XCOPA's validation split


@pytest.mark.parametrize("name", preset_names())
def test_preset_stage2_matches_the_authors_total_update(name):
    """Every preset's stage 2 moves the weights as far as the authors' run (same sum of
    learning rates within 1%), and its comment states the numbers it was derived from."""
    cfg = load_config(config_path(name))
    task = cfg.task.name
    theirs = authors_update(*AUTHORS_PAIR_SETS[task])
    d = cfg.distill
    plan = plan_steps(UNLABELED[task], d.global_batch, 1, d.epochs, 1, d.max_steps)
    total = plan.total_optimizer_steps
    ours = lr_sum(d.schedule, total, int(d.warmup_ratio * total), d.lr)
    assert ours == pytest.approx(theirs.lr_sum, rel=0.01), (name, ours, theirs)
    text = config_path(name).read_text()
    block = text[text.index("distill:") : text.index("\neval:")]
    flat = re.sub(r"\s*#\s*", " ", block)
    assert f"{theirs.steps:,} steps at 3e-8" in flat, flat
    assert f"{total:,} steps" in flat and f"lr {_sci(d.lr)}" in flat, flat
    assert f"sum to {_sci(theirs.lr_sum)}" in flat, flat
    # ours, and its share of theirs (to the comment's 0.1 point)
    said = re.search(rf"\): {re.escape(_sci(ours))}, ([\d.]+)% of theirs", flat)
    assert said is not None, (_sci(ours), flat)
    assert abs(float(said.group(1)) - 100 * ours / theirs.lr_sum) <= 0.1, said.group(0)


def _sci(x: float) -> str:
    """1.96e-6 the way the presets' comments write it."""
    return re.sub(r"e-0(\d)", r"e-\1", f"{x:.2e}")
