"""The update bound and the parameter-change statistics against naive references."""

from __future__ import annotations

import math

import pytest
import torch

from alsace_ds.method import movement
from alsace_ds.method.movement import change_stats, ulp, update_bound


def _naive_ulp(x: float, bits: int) -> float:
    if x == 0.0:
        return 0.0
    _, e = math.frexp(abs(x))
    return math.ldexp(1.0, e - bits)


def test_ulp_matches_the_dtype_spacing():
    w = torch.tensor([0.0, 1.0, -0.75, 0.0133, 3.0e-5, 1e4])
    for dtype, tdtype, bits in (("bf16", torch.bfloat16, 8), ("fp32", torch.float32, 24)):
        got = ulp(w, dtype).tolist()
        assert got == [_naive_ulp(float(x), bits) for x in w]
        # the spacing torch itself has there: the next representable value up
        for x, u in zip(w.tolist()[1:], got[1:], strict=True):
            here = torch.tensor(abs(x), dtype=tdtype)
            up = torch.nextafter(here, torch.tensor(math.inf, dtype=tdtype))
            if float(here) == abs(x):  # exactly representable: spacing above it
                assert float(up - here) == pytest.approx(u)


def test_update_bound_against_a_naive_loop():
    gen = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(40, 30, generator=gen) * 0.02, "b": torch.randn(50, generator=gen)}
    weights["b"][3] = 0.0
    bound = 3e-6
    b = update_bound(weights, bound, "bf16")
    flat = [float(x) for w in weights.values() for x in w.reshape(-1)]
    rms = math.sqrt(sum(x * x for x in flat) / len(flat))
    share = sum(1.0 if x == 0 else min(1.0, bound / _naive_ulp(x, 8)) for x in flat) / len(flat)
    assert b["num_weights"] == len(flat) == 1250
    assert b["rms_weight"] == pytest.approx(rms, rel=1e-12)
    assert b["relative_bound"] == pytest.approx(bound / rms, rel=1e-12)
    assert b["changeable_share"] == pytest.approx(share, rel=1e-12)
    assert "stays under 0.0001" in b["cannot_change"] and b["changeable_share"] > 0.01


def test_cannot_change_reasons():
    w = {"w": torch.full((1000,), 0.05)}  # bf16 step at 0.05: 2**-12 = 2.4e-4
    tiny = update_bound(w, 4.8e-7, "bf16")  # the old presets: 32 steps at 3e-8, linear decay
    assert tiny["relative_bound"] == pytest.approx(9.6e-6)
    assert "||delta||/||theta|| stays under 0.0001" in tiny["cannot_change"]
    assert "only 0.20% of the weights can change their bf16 value" in tiny["cannot_change"]
    assert "only" not in (update_bound(w, 4.8e-7, "fp32")["cannot_change"] or "")
    fine = update_bound(w, 2.8e-3, "bf16")  # the re-derived presets
    assert fine["cannot_change"] is None and fine["changeable_share"] == 1.0
    # just above both thresholds: no warning
    edge = update_bound(w, 0.05 * movement.MIN_RELATIVE_UPDATE * 1.01, "fp32")
    assert edge["cannot_change"] is None


def test_change_stats_against_a_naive_loop():
    gen = torch.Generator().manual_seed(1)
    start = {"x": torch.randn(7, 5, generator=gen), "y": torch.randn(11, generator=gen) * 0.01}
    end = {k: v.clone() for k, v in start.items()}
    end["x"][0, :3] += 1e-3
    end["y"][4] -= 1e-9  # changes fp32, not its bf16 value
    end["extra"] = torch.ones(3)  # not a trainable weight: ignored
    c = change_stats(start, end, "bf16")
    a = [float(v) for t in start.values() for v in t.reshape(-1)]
    b = [float(v) for k in start for v in end[k].reshape(-1)]
    d = math.sqrt(sum((y - x) ** 2 for x, y in zip(a, b, strict=True)))
    assert c["num_weights"] == 46
    assert c["relative_change"] == pytest.approx(d / math.sqrt(sum(x * x for x in a)), rel=1e-9)
    assert c["changed_share"] == pytest.approx(4 / 46)
    bf = [torch.tensor(v).bfloat16() for v in a], [torch.tensor(v).bfloat16() for v in b]
    assert c["changed_share_compute"] == pytest.approx(
        sum(bool(x != y) for x, y in zip(*bf, strict=True)) / 46
    )
    assert c["max_abs_change"] == pytest.approx(max(abs(y - x) for x, y in zip(a, b, strict=True)))
    with pytest.raises(KeyError, match="x: in the start weights but not in the end"):
        change_stats(start, {"y": end["y"]})


def test_chunking_gives_the_same_answer(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w = {"w": torch.randn(1000, generator=gen)}
    e = {"w": w["w"] + 1e-4 * torch.randn(1000, generator=gen)}
    whole = change_stats(w, e, "bf16"), update_bound(w, 1e-4, "bf16")
    monkeypatch.setattr(movement, "CHUNK", 7)
    parts = change_stats(w, e, "bf16"), update_bound(w, 1e-4, "bf16")
    for x, y in zip(whole, parts, strict=True):
        for key in ("relative_change", "changed_share", "changeable_share", "rms_weight"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-12), key
