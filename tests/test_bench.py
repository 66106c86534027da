"""Smoke test of the benchmarks in ``bench/`` on the tiny model: each runs end to end on small
shapes and its equalities hold (the timings themselves are not checked)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import distill_throughput  # noqa: E402
import selection_bucketing  # noqa: E402
import zero_memory  # noqa: E402

from alsace_ds.method.pairs import build_pairs, pair_kl_loss  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _bench_cache(tmp_path_factory):
    """The tiny model is built into a fresh ALSACE_CACHE, once for the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALSACE_CACHE", str(tmp_path_factory.mktemp("bench_cache")))
        yield


def test_pair_counts_of_the_shapes():
    for name, pairs in (("xnli", 77), ("pawsx", 15)):
        shape = distill_throughput.SHAPES[name]
        assert len(build_pairs(shape["languages"], shape["teachers"], "unordered")) == pairs


def test_authors_kldivloss_convention_equals_pair_kl_loss():
    """KLDivLoss(batchmean, log_target)(lp[t2], lp[t1]) averaged over the unordered pairs is
    pair_kl_loss(pairs="unordered"), on random distributions (no model involved)."""
    langs, teachers = ["en", "a", "b", "c", "d"], ["b", "en"]
    lp = torch.log_softmax(torch.randn(6, len(langs), 3, dtype=torch.float64) * 2, dim=-1)
    kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    pairs = build_pairs(langs, teachers, "unordered")
    authors = sum(kl(lp[:, t2], lp[:, t1]) for t1, t2 in pairs) / len(pairs)
    ours = pair_kl_loss(lp, langs, teachers, pairs="unordered")
    assert float(ours) == pytest.approx(float(authors), rel=1e-12)
    # and the other argument order is a different quantity (the check has teeth)
    swapped = sum(kl(lp[:, t1], lp[:, t2]) for t1, t2 in pairs) / len(pairs)
    assert abs(float(swapped) - float(ours)) > 1e-3


def test_distill_throughput_tiny(tmp_path):
    out = tmp_path / "distill.json"
    res = distill_throughput.main(
        ["--model", "tiny", "--shapes", "pawsx", "--batch", "3", "--max-length", "32",
         "--repeats", "1", "--check-batch", "0", "--threads", "1", "--out", str(out)]
    )  # fmt: skip
    assert out.is_file()
    r = res["shapes"]["pawsx"]
    assert r["num_pairs"] == 15
    assert r["forwards_per_example"] == {"ours": 7, "pairwise": 30}
    c64 = r["check_float64"]
    assert c64["examples"] == 3
    assert c64["loss"]["rel_diff"] <= 1e-6
    assert c64["grad"]["rel_to_max_grad"] <= 1e-6
    assert c64["grad"]["max_abs_grad"] > 0
    # float32: reported, not compared (the tiny random model's KL is ~1e-9, all rounding)
    assert all(math.isfinite(x) for x in r["float32_full_batch"]["loss"].values())
    assert r["speedup"] > 0 and len(r["seconds_per_step"]["ours"]) == 1


def test_selection_bucketing_tiny(tmp_path):
    res = selection_bucketing.main(
        ["--model", "tiny", "--examples", "12", "--languages", "pawsx", "--batch-size", "8",
         "--repeats", "1", "--threads", "1", "--out", str(tmp_path / "sel.json")]
    )  # fmt: skip
    checks = res["checks"]
    assert checks["pseudo_labels_identical"] and checks["teachers_identical"]
    assert checks["probs_max_abs_diff"] <= 1e-5
    assert checks["predict_probs_max_abs_diff_vs_bucketed"] <= 1e-5
    assert res["views"] == 12 * 7
    orders = res["orders"]
    assert orders["bucketed"]["padding_fraction"] < orders["arrival"]["padding_fraction"]
    assert res["oracle_token_sorted_padding_fraction"] <= orders["arrival"]["padding_fraction"]


@pytest.mark.launch
def test_zero_memory_tiny_zero3(tmp_path, shm_op):
    """One real 2-rank launch under ZeRO-3 with every parameter partitioned: each rank holds
    about half of every parameter, and AdamW state for its half only."""
    res = zero_memory.main(
        ["--model", "tiny", "--configs", "zero3", "--steps", "1", "--micro-batch", "2",
         "--seq-len", "16", "--persistence-threshold", "0", "--out", str(tmp_path / "zm.json")]
    )  # fmt: skip
    ranks = res["configs"]["zero3"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    full = ranks[0]["params"]["full_numel"]
    parts = [r["params"]["partition_numel"] for r in ranks]
    assert sum(parts) >= full  # the partitions cover the model (up to padding)
    for r in ranks:
        par, opt = r["params"], r["optimizer"]
        assert par["full_numel"] == full
        assert par["partition_share"] == pytest.approx(0.5, abs=0.02)
        assert par["resident_gathered_numel"] == 0  # threshold 0: nothing stays gathered
        # exp_avg + exp_avg_sq over this rank's fp32 partition (+ a scalar step per group)
        assert opt["state_bytes"] == pytest.approx(2 * 4 * par["partition_numel"], rel=0.01)
        assert r["peak_rss_bytes"] > r["rss_start_bytes"] > 0
        assert all(math.isfinite(x) for x in r["losses"])


@pytest.mark.launch
def test_limits_tiny(tmp_path):
    """The limit benchmark runs the real stages (token cache, recipe steps, predict_probs)
    against the bare model on the same sequences, and reports ratios and paddings."""
    import json
    import os
    import subprocess

    out = tmp_path / "limits.json"
    cmd = [sys.executable, str(BENCH / "limits.py"), "--model", "tiny", "--examples", "8",
           "--repeats", "1", "--steps", "1", "--workdir", str(tmp_path),
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    by = {r["stage"]: r for r in data["results"]}
    assert set(by) == {"distill", "stage0", "inference"}
    assert by["distill"]["sequences"][0] == 4 * 15  # micro-batch x every language, one rank
    assert by["stage0"]["sequences"][0] == 16
    for r in (by["distill"], by["stage0"]):
        assert math.isfinite(r["overhead_vs_fwd_bwd"]) and r["times"]["ours"]["median_s"] > 0
    inf = by["inference"]
    assert inf["views_per_rank"] == 8 * 15
    assert inf["padding"]["ours"] == inf["padding"]["bare_sorted"]  # the same token order
    assert inf["padding"]["ours"] <= inf["padding"]["before"]
    assert len(data["verdicts"]) == 3 and "inference: padding" in data["verdicts"][2]
