"""ZeRO memory planner (alsace_ds.tools.plan): formula values, counting, recommendation, CLI."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys

import pytest

from alsace_ds.tools import plan
from alsace_ds.tools.plan import GIB, PlanError, estimate, plan_rows, recommend

PSI = 10**9


def _states(e: dict) -> float:
    return e["params"] + e["grads"] + e["optimizer"]


def test_mixed_precision_formulas_zero_paper():
    n = 64
    assert _states(estimate(PSI, 0, False, False, n, "bf16")) == 16 * PSI
    assert _states(estimate(PSI, 1, False, False, n, "bf16")) == 4 * PSI + 12 * PSI / n
    assert _states(estimate(PSI, 2, False, False, n, "bf16")) == 2 * PSI + 14 * PSI / n
    e3 = estimate(PSI, 3, False, False, n, "bf16")
    assert _states(e3) == 16e9 / 64
    assert (e3["params"], e3["grads"], e3["optimizer"]) == (2 * PSI / n, 2 * PSI / n, 12 * PSI / n)
    assert e3["cpu_per_node"] == 0 and e3["working"] == 0


def test_fp32_formulas():
    e0 = estimate(PSI, 0, False, False, 8, "fp32")
    assert (e0["params"], e0["grads"], e0["optimizer"]) == (4 * PSI, 4 * PSI, 8 * PSI)
    assert _states(estimate(PSI, 3, False, False, 8, "fp32")) == 16 * PSI / 8


def test_offload_and_working_set():
    n, gpn = 64, 8
    e = estimate(PSI, 2, False, True, n, "bf16", gpus_per_node=gpn)
    assert (e["params"], e["grads"], e["optimizer"]) == (2 * PSI, 0, 0)
    assert e["cpu_per_node"] == 16 * PSI / n * gpn
    e = estimate(PSI, 3, True, True, n, "bf16", gpus_per_node=gpn, largest_layer_params=10**8)
    assert _states(e) == 0
    assert e["working"] == 4 * 10**8  # gathered 16-bit params + grads of the largest layer
    assert e["gpu_total"] == 4 * 10**8
    assert e["cpu_per_node"] == 18 * PSI / n * gpn
    with pytest.raises(PlanError):
        estimate(PSI, 1, False, True, n)
    with pytest.raises(PlanError):
        estimate(PSI, 2, True, True, n)


def test_deepspeed_cross_check_values():
    gpu, cpu = plan.deepspeed_estimate(PSI, 3, False, False, 2, 8, largest_layer_params=10**8)
    assert gpu == 4 * 10**8 + int(18 * PSI / 16)
    gpu, cpu = plan.deepspeed_estimate(PSI, 2, False, True, 1, 8)
    assert gpu == 2 * PSI
    gpu, cpu = plan.deepspeed_estimate(PSI, 3, True, True, 2, 8)
    assert cpu == pytest.approx(PSI * 18 / 2 * 1.5)
    assert plan.deepspeed_estimate(PSI, 1, False, False, 1, 8) is None


def _rec(gpu_gib: float, **kw) -> str | None:
    rows = plan_rows(PSI, 1, 8, "bf16", gpu_mem_gib=gpu_gib, headroom=0.0, **kw)
    best = recommend(rows)
    return best["label"] if best else None


def test_recommendation_for_crafted_memory():
    # Psi = 1e9 on 8 GPUs, bf16: ZeRO-0 14.90 GiB, ZeRO-1 5.12, ZeRO-2 3.49 (DeepSpeed 3.96),
    # ZeRO-3 1.86 (DeepSpeed 2.10), ZeRO-2+off 1.86, ZeRO-3+off 0.23, ZeRO-3+param ~0.
    assert _rec(16) == "ZeRO-0"
    assert _rec(10) == "ZeRO-1"
    assert _rec(4.5) == "ZeRO-2"
    # Between the two ZeRO-2 estimates: the decision takes the larger (DeepSpeed's) one ...
    assert _rec(3.8) == "ZeRO-3"
    # ... unless DeepSpeed's estimators are switched off.
    assert _rec(3.8, use_deepspeed=False) == "ZeRO-2"
    # ZeRO-3 without offload is preferred over ZeRO-2 with offload (same GPU need here).
    assert _rec(2.2) == "ZeRO-3"
    assert _rec(1.0) == "ZeRO-3 +off-opt"
    assert _rec(0.1) == "ZeRO-3 +off-opt+param"
    assert _rec(0.1, cpu_mem_gib=1.0) is None  # offload needs ~2 GiB of host RAM per node
    # headroom: 20% of 18 GiB leaves 14.4 < 14.9 GiB, so ZeRO-0 no longer fits
    rows = plan_rows(PSI, 1, 8, "bf16", gpu_mem_gib=18, headroom=0.2)
    assert recommend(rows)["label"] == "ZeRO-1"
    assert plan.min_gpus_for_zero3(PSI, "bf16", 80, 0.2) == 1
    assert plan.min_gpus_for_zero3(13 * PSI, "bf16", 80, 0.2) == 4  # 208e9 B / 68.7e9 B


def test_builtin_counts_match_reported_sizes():
    reported = {k: v["reported"] for k, v in plan.KNOWN_MODELS.items()}
    for name, size in reported.items():
        count = plan.known_model_params(name)
        assert abs(count.total / size - 1) < 0.03, (name, count.total)
    # mT5-small: 2 x 250112 x 512 embedding/lm_head + 8+8 layers, the well-known 300,176,768
    assert plan.known_model_params("google/mt5-small").total == 300_176_768
    assert plan.known_model_params("mt5-small").largest_layer == 250112 * 512


@pytest.mark.parametrize("family", ["xlmr", "mt5"])
def test_meta_count_equals_real_model(tmp_path, family):
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    from alsace_ds.models.tiny import build_tiny_model

    words = ["the cat sat on the mat", "a dog ran", "hello world"]
    folder = build_tiny_model(tmp_path / family, family, words, ["a", "b", "c"])
    cls = AutoModelForSeq2SeqLM if family == "mt5" else AutoModelForSequenceClassification
    real = cls.from_pretrained(folder)
    expected = sum(p.numel() for p in real.parameters())
    count = plan.resolve_params(str(folder))
    assert count.total == expected
    assert count.largest_layer == max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in real.modules()
    )


def test_config_yaml_uses_model_and_dtype(tmp_path, capsys):
    from alsace_ds.models.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "m", "xlmr", ["x y z"], ["a", "b"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  family: xlmr\n  name_or_path: {folder}\n  dtype: fp32\n")
    assert plan.main(["--config", str(cfg), "--no-deepspeed"]) == 0
    out = capsys.readouterr().out
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(folder))
    counted = sum(p.numel() for p in model.parameters())  # independently: 76,290
    assert counted == 76_290 and "76,290 params" in out, out
    assert "dtype fp32" in out and "recommendation: ZeRO-0" in out


def test_cli_subprocess_with_params():
    cmd = [sys.executable, "-m", "alsace_ds.tools.plan", "--params", "13e9", "--nodes", "1"]
    cmd += ["--gpus-per-node", "8", "--gpu-mem", "80", "--stage", "3", "--no-deepspeed"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "13,000,000,000 params" in out
    for label, _, _, _ in plan.OPTIONS:
        assert label in out
    assert "Activations" in out
    # the default is the trainer's fp32 states: 13e9 x 4 bytes = 48.43 GiB of params per GPU
    # for ZeRO-0..2, Adam's two fp32 moments 96.86 GiB
    line0 = next(x for x in out.splitlines() if x.strip().startswith("ZeRO-0 "))
    assert line0.split()[1:5] == ["48.43", "48.43", "96.86", "0.00"]
    # ZeRO-2: 4 + 12/8 bytes/param = 66.59 GiB > 64 GiB; ZeRO-3: 16/8 = 24.21 GiB.
    assert "recommendation: ZeRO-3 (needs 24.21 GiB of 64.00 GiB per GPU)" in out
    assert "requested ZeRO-3: fits" in out
    # the 16-bit-weights what-if keeps the ZeRO paper's 2/2/12 accounting
    res = subprocess.run([*cmd, "--dtype", "bf16"], capture_output=True, text=True, timeout=60)
    line0 = next(x for x in res.stdout.splitlines() if x.strip().startswith("ZeRO-0 "))
    assert line0.split()[1:5] == ["24.21", "24.21", "145.29", "0.00"]
    assert "recommendation: ZeRO-2 (needs 45.40 GiB of 64.00 GiB per GPU)" in res.stdout


def test_unknown_model_clear_error(capsys):
    assert plan.main(["--model", "org/not-a-model-xyz", "--no-deepspeed"]) == 2
    err = capsys.readouterr().err
    assert "org/not-a-model-xyz" in err and "--params" in err and "local" in err
    with pytest.raises(PlanError, match="never downloads"):
        plan.resolve_params("xlm-roberta-huge")


def test_json_output(capsys):
    assert plan.main(["--params", "1e9", "--gpus-per-node", "64", "--json", "--no-deepspeed"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    z3 = next(r for r in data["rows"] if r["label"] == "ZeRO-3")
    assert z3["params"] + z3["grads"] + z3["optimizer"] == 16e9 / 64
    assert data["recommendation"] == "ZeRO-0"
    assert GIB == 2**30
