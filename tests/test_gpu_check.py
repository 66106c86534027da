"""The GPU check (``bench/gpu_check.sh`` / ``bench/gpu_check.py``) without a GPU: it refuses to
run on the CPU unless told to, its FLOPs formula is the hand count and torch's count, the
throughput bench runs on the CPU in bf16 with consistent figures, and the plumbing mode runs
the real pipeline end to end with every figure marked as not a GPU figure."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPT = BENCH / "gpu_check.sh"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import distill_throughput  # noqa: E402
import gpu_check  # noqa: E402

PLUMBING = "cpu plumbing check, not a GPU figure"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def script_env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    env.pop("OUT", None)
    env.update(
        PYTHON=sys.executable,  # this venv, wherever the test runs from
        ALSACE_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


# ----------------------------------------------------------------------------- refusal


@pytest.mark.launch
@no_cuda
def test_refuses_to_run_without_cuda(tmp_path, cache):
    """No flag, no CUDA: an immediate, loud failure (exit 2), nothing else run."""
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(SCRIPT), "--out-dir", str(out), "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, env=script_env(cache), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "gpu_check: environment: FAIL" in res.stdout
    assert "torch.cuda.is_available() is False" in res.stderr
    assert "RESULT: FAIL (environment refused" in res.stderr
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["mode"] == "gpu" and data["passed"] is False
    assert data["failed"] == ["environment"] and len(data["checks"]) == 1
    assert data["checks"][0]["figures"]["cuda_available"] is False
    assert not (tmp_path / "work").exists()  # no pipeline was started


@no_cuda
def test_throughput_bench_refuses_cuda_without_cuda():
    with pytest.raises(SystemExit, match="refusing to run on the CPU instead"):
        distill_throughput.main(["--model", "tiny", "--device", "cuda"])


# ----------------------------------------------------------------------------- FLOPs


E5 = {"layers": 12, "hidden": 384, "ffn": 1536, "num_labels": 3}


def test_encoder_flops_by_hand():
    """multilingual-e5-small, 3 labels, one sequence of 128 positions:
    weight matmuls 2 x 12 x (4 x 384^2 + 2 x 384 x 1536) = 42,467,328 per token,
    attention 4 x 12 x 128 x 384 = 2,359,296 per token, x 128 tokens = 5,737,807,872,
    head 2 x (384^2 + 384 x 3) = 297,216 -> forward 5,738,105,088, step (x 3) 17,214,315,264."""
    assert common.encoder_forward_flops(**E5, seq_len=128) == 5_738_105_088
    assert common.step_flops(E5, [(1, 128)]) == 17_214_315_264
    # the GPU check's shape: 64 examples x 15 views at padded width 128 = 16.5 TFLOP / step
    assert common.step_flops(E5, [(64 * 15, 128)]) == 960 * 17_214_315_264 == 16_525_742_653_440
    # several forwards add up; the e5 numbers come from the real config values
    assert common.step_flops(E5, [(2, 64), (3, 32)]) == 3 * (
        common.encoder_forward_flops(**E5, seq_len=64, num_seqs=2)
        + common.encoder_forward_flops(**E5, seq_len=32, num_seqs=3)
    )
    from transformers import BertConfig, T5Config

    e5_cfg = BertConfig(
        **{k: v for k, v in common.E5_SMALL.items() if k != "position_embedding_type"},
        num_labels=3,
    )
    assert common.encoder_shape(e5_cfg) == E5
    assert common.encoder_shape(T5Config()) is None  # not an encoder the formula describes
    assert common.step_flops(None, [(1, 128)]) is None


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_flops_formula_equals_torch_flop_counter(arch):
    """Forward = the formula exactly, forward + backward = 3 x, by torch's own counter
    (eager attention: every matmul visible), with padding in the batch."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
    )

    kw = dict(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=96, max_position_embeddings=40, num_labels=3,
              attn_implementation="eager")  # fmt: skip
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(**kw))
    else:
        model = XLMRobertaForSequenceClassification(XLMRobertaConfig(**kw, pad_token_id=1))
    model.eval()
    ids = torch.randint(5, 200, (3, 16))  # [n, L]
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padded positions are computed all the same
    shape = common.encoder_shape(model.config)
    assert shape == {"layers": 2, "hidden": 64, "ffn": 96, "num_labels": 3}
    with FlopCounterMode(display=False) as fwd:
        model(input_ids=ids, attention_mask=mask)
    assert fwd.get_total_flops() == common.encoder_forward_flops(**shape, seq_len=16, num_seqs=3)
    with FlopCounterMode(display=False) as both:
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert both.get_total_flops() == common.step_flops(shape, [(3, 16)])


def test_datasheet_peaks():
    assert common.datasheet_peak_tflops("NVIDIA H200")[0] == 989.4
    assert common.datasheet_peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.4
    assert common.datasheet_peak_tflops("NVIDIA H100 PCIe")[0] == 756.5
    assert common.datasheet_peak_tflops("NVIDIA H200 NVL")[0] == 835.5
    assert common.datasheet_peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert common.datasheet_peak_tflops("NVIDIA GeForce RTX 4090") == (None, None)
    assert common.datasheet_peak_tflops(None) == (None, None)


def test_e5_random_words_are_one_piece_each():
    """The synthetic e5 vocabulary: distinct words that the word-level tokenizer keeps whole,
    so a drawn id decodes and re-encodes to itself (the views have the lengths drawn)."""
    from alsace_ds.models.tiny import build_word_tokenizer

    words = common._synthetic_words(3000)
    assert len(set(words)) == 3000 and all(w.isalpha() and len(w) >= 3 for w in words)
    tok = build_word_tokenizer(words, "xlmr")
    assert len(tok) == 3000 + 5 and tok.pad_token_id == common.E5_SMALL["pad_token_id"]
    ids = [7, 1234, 3004]
    assert tok(tok.decode(ids))["input_ids"] == [0, *ids, 2]


# ----------------------------------------------------------------------------- throughput


def test_throughput_bench_tiny_cpu_bf16(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("ALSACE_CACHE", str(cache))
    res = distill_throughput.main(
        ["--model", "tiny", "--shapes", "xnli", "--batch", "2", "--max-length", "32",
         "--min-tokens", "8", "--max-tokens", "16", "--repeats", "2", "--threads", "1",
         "--device", "cpu", "--dtype", "bf16", "--matmul-n", "256",
         "--out", str(tmp_path / "dt.json")]
    )  # fmt: skip
    assert res["device"] == "cpu" and res["dtype"] == "bf16"
    assert json.loads((tmp_path / "dt.json").read_text())["shapes"]["xnli"]["dtype"] == "bf16"
    r = res["shapes"]["xnli"]
    assert r["compute"] == "bf16 autocast, fp32 parameters"
    b, t, width = 2, 15, r["padded_width"]["ours"]
    assert r["view_tokens"]["max"] == width <= 32
    # FLOPs of ours: B*T sequences at the common padded width, the tiny model's shape
    tiny = {"layers": 2, "hidden": 64, "ffn": 128, "num_labels": 3}
    assert r["model_flops_per_step"]["ours"] == common.step_flops(tiny, [(b * t, width)])
    assert r["model_flops_per_step"]["ours_non_pad"] < r["model_flops_per_step"]["ours"]
    fc = r["flops_check_vs_flop_counter"]
    assert fc["counted"] == fc["formula"] > 0 and fc["formula_over_counted"] == 1.0
    # figures consistent with each other
    med = r["median_seconds_per_step"]["ours"]
    assert r["examples_per_s"]["ours"] == pytest.approx(b / med)
    assert r["achieved_tflops"]["ours"] == pytest.approx(
        r["model_flops_per_step"]["ours"] / med / 1e12
    )
    mfu, mm = r["mfu"], res["matmul"]
    assert mm["n"] == 256 and mm["dtype"] == "bfloat16" and mm["median_tflops"] > 0
    assert mfu["measured_matmul_tflops"] == mm["median_tflops"]
    assert 0 < mfu["ours_vs_measured_matmul"] < 1
    assert mfu["peak_datasheet_tflops"] is None and mfu["ours_vs_datasheet"] is None  # a CPU
    # bf16 steps compute the same loss as fp32 up to bf16 rounding; float64 is exact
    low = r["bf16_full_batch"]
    assert all(math.isfinite(x) for x in low["loss"].values())
    assert r["check_float64"]["loss"]["rel_diff"] <= 1e-6
    assert r["cuda_peak_memory_bytes"] is None


# ----------------------------------------------------------------------------- export


def _write_model(folder: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))


def test_export_check_fails_on_bf16_weights_and_on_no_update(tmp_path):
    w = {"a.weight": torch.randn(4, 3), "a.bias": torch.zeros(3)}
    run = tmp_path / "run"
    _write_model(run / "stage0" / "model", w)
    _write_model(run / "final" / "model", {k: v.to(torch.bfloat16) for k, v in w.items()})
    rep = gpu_check.Report(tmp_path / "out", plumbing=True, budget_s=1)
    gpu_check.check_export(rep, "zero2", run)
    check = rep.checks[-1]
    assert check["status"] == "FAIL"
    assert any("not float32 only" in p for p in check["problems"])
    assert check["figures"]["final_model_dtypes"] == ["bfloat16"]

    # float32, but nothing changed (a bf16 copy rounding every update away would do this)
    run2 = tmp_path / "run2"
    _write_model(run2 / "stage0" / "model", w)
    _write_model(run2 / "final" / "model", {k: v.clone() for k, v in w.items()})
    gpu_check.check_export(rep, "zero3", run2)
    assert rep.checks[-1]["status"] == "FAIL"
    assert any("no weight of final/model differs" in p for p in rep.checks[-1]["problems"])

    # one element moved by 1e-7: float32 carries it, and the check sees it
    run3 = tmp_path / "run3"
    moved = {k: v.clone() for k, v in w.items()}
    moved["a.weight"][0, 0] += 1e-7 * max(1.0, abs(float(moved["a.weight"][0, 0])))
    _write_model(run3 / "stage0" / "model", w)
    _write_model(run3 / "final" / "model", moved)
    gpu_check.check_export(rep, "zero2", run3)
    good = rep.checks[-1]
    assert good["status"] == "PASS", good["problems"]
    d = good["figures"]["final_vs_distill_start"]
    assert d["elements"] == 15 and d["changed"] == 1 and 0 < d["max_abs_delta"] < 1e-5
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["failed"] == [
        "export zero2", "export zero3"
    ]  # fmt: skip


# ----------------------------------------------------------------------------- end to end


@pytest.mark.launch
def test_cpu_plumbing_end_to_end(tmp_path, cache, shm_op):
    """The real pipeline under the real launcher on the CPU (ZeRO-2, bf16 autocast; stage 0
    one epoch to fit the test's time), export and reload checks; figures marked."""
    out, work = tmp_path / "out", tmp_path / "work"
    res = subprocess.run(
        ["bash", str(SCRIPT), "--cpu-plumbing", "--pipelines", "zero2", "--dtype", "bf16",
         "--pipeline-override", "stage0.epochs=1", "--skip-throughput",
         "--out-dir", str(out), "--work-dir", str(work)],
        cwd=ROOT, env=script_env(cache), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["passed"] is True and data["failed"] == []
    assert data["mode"] == PLUMBING == data["figure_status"]
    names = [c["name"] for c in data["checks"]]
    assert names == ["environment", "pipeline zero2 bf16", "export zero2", "reload zero2", "budget"]
    assert all(c["figure_status"] == PLUMBING for c in data["checks"])
    lines = [x for x in res.stdout.splitlines() if x.startswith("gpu_check: ") and ": PASS" in x]
    assert len(lines) == 5 and all(x.endswith(f"[{PLUMBING}]") for x in lines)
    checks = {c["name"]: c["figures"] for c in data["checks"]}
    assert checks["environment"]["deepspeed_accelerator"] == "cpu"

    pipe = checks["pipeline zero2 bf16"]
    assert pipe["rc"] == 0 and pipe["english_before"] > 80
    report = json.loads((work / "pipeline-zero2" / "report.json").read_text())
    assert pipe["accuracy_after"] == report["after"]["accuracy"]
    assert all(0 <= v <= 100 for v in pipe["accuracy_before"].values())

    exp = checks["export zero2"]
    for key in ("stage0_model", "distill_start", "final_model"):
        assert exp[f"{key}_dtypes"] == ["float32"]  # bf16 = fp32 master weights + autocast
    d = exp["final_vs_distill_start"]
    assert d["elements"] == exp["final_model_numel"] and 0 < d["changed"] <= d["elements"]
    assert d["max_abs_delta"] > 0

    rel = checks["reload zero2"]
    assert rel["bf16_autocast"] is True and rel["max_length"] == 32
    assert rel["test_examples"] == report["num_test_examples"]
    for when in ("after", "before"):
        assert set(rel[when]["recomputed"]) == set(report[when]["accuracy"]), when  # every one
        for lang, acc in rel[when]["recomputed"].items():
            assert acc == pytest.approx(report[when]["accuracy"][lang], abs=0.5), (when, lang)

    # the reload check has teeth: a report 2 points off is caught
    report["after"]["accuracy"]["en"] += 2.0
    rep = gpu_check.Report(tmp_path / "out2", plumbing=True, budget_s=1)
    gpu_check.check_reload(rep, "zero2", {"run_dir": work / "pipeline-zero2", "report": report},
                           tol=0.5)  # fmt: skip
    assert rep.checks[-1]["status"] == "FAIL"
    assert "'en'" in rep.checks[-1]["problems"][0]
