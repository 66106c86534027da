"""How far a training stage CAN move the weights (before it runs), and how far it DID.

Pure tensor math on CPU copies of the trainable weights (rank 0 holds them; see
``trainer.rank0_state_dict``). ``bound`` is the largest Adam movement of one weight over the
stage, ``schedules.lr_sum`` (about one learning rate per step, see there).

Why a warning is needed: a stage whose bound is far below the weights' scale trains for hours
and changes nothing (no accuracy moves). Two views of "too small":

- relative: ``||delta|| / ||theta|| <= bound / rms(theta)``; below ``MIN_RELATIVE_UPDATE``
  nothing measurable happens;
- resolution of the compute dtype: under bf16 compute every weight is rounded to bf16 (8
  significant bits) in each matmul. A fp32 weight moved by ``d`` changes its bf16 value with
  probability ``min(1, d / ulp_bf16(w))`` (its position inside the bf16 rounding cell is
  arbitrary), so ``mean(min(1, bound / ulp))`` is the largest share of weights whose bf16 value
  the stage can change; below ``MIN_CHANGEABLE_SHARE`` the compute barely sees the update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

#: Below this bound on ||delta|| / ||theta|| a stage is reported as unable to change the model
#: (10x above a relative movement of ~1e-5, which left every accuracy unchanged).
MIN_RELATIVE_UPDATE = 1e-4
#: Below this share of weights whose bf16 value can change, bf16 compute cannot see the update.
MIN_CHANGEABLE_SHARE = 0.01
#: Significant bits (implicit one included) of each compute dtype.
SIGNIFICAND_BITS = {"fp32": 24, "bf16": 8}
#: Elements per chunk: mT5-large's 256M-element embedding in float64 would need 2 GB at once.
CHUNK = 1 << 22


def _chunks(t: Tensor) -> list[Tensor]:
    flat = t.detach().reshape(-1)
    return [flat[i : i + CHUNK] for i in range(0, flat.numel(), CHUNK)]


def ulp(w: Tensor, dtype: str) -> Tensor:
    """Spacing of ``dtype``'s values around each ``|w|`` (``[n]``); 0 where ``w == 0``."""
    _, exp = torch.frexp(w.abs().double())  # |w| = m * 2**exp, m in [0.5, 1)
    out = torch.ldexp(torch.ones_like(exp, dtype=torch.float64), exp - SIGNIFICAND_BITS[dtype])
    return torch.where(w == 0, torch.zeros_like(out), out)


def update_bound(weights: Mapping[str, Tensor], bound: float, compute_dtype: str) -> dict:
    """What a stage whose Adam movement per weight is at most ``bound`` can do to ``weights``
    (the trainable ones). Returns plain floats: ``bound``, ``rms_weight``, ``relative_bound``
    (bound on ||delta|| / ||theta||), ``changeable_share`` (share of weights whose value in the
    compute dtype can change), ``median_abs_weight`` and ``median_ulp`` in that dtype, and
    ``cannot_change`` with the reason in plain words when it cannot."""
    sq, n, share = 0.0, 0, 0.0
    samples = []
    for w in weights.values():
        for part in _chunks(w):
            flat = part.double()
            sq += float((flat * flat).sum())
            n += flat.numel()
            u = ulp(flat, compute_dtype)
            # a weight at 0 can always move to a new value
            can = torch.where(u > 0, (bound / u.clamp_min(1e-300)).clamp(max=1.0), 1.0)
            share += float(can.sum())
            step = max(1, flat.numel() // 4096)  # the median from an even sample of each chunk
            samples.append(flat[::step].abs())
    if n == 0:
        raise ValueError("no trainable weights")
    rms = math.sqrt(sq / n)
    med = float(torch.cat(samples).median())
    out = {
        "bound": bound,
        "compute_dtype": compute_dtype,
        "num_weights": n,
        "rms_weight": rms,
        "relative_bound": bound / rms if rms > 0 else math.inf,
        "median_abs_weight": med,
        "median_ulp": float(ulp(torch.tensor([med]), compute_dtype)[0]),
        "changeable_share": share / n,
    }
    out["cannot_change"] = cannot_change_reason(out)
    return out


def cannot_change_reason(b: Mapping) -> str | None:
    """Plain words when a bound from :func:`update_bound` cannot change the model, else None."""
    reasons = []
    if b["relative_bound"] < MIN_RELATIVE_UPDATE:
        reasons.append(
            f"it can move any weight by at most {b['bound']:.2e} (the sum of its learning "
            f"rates under Adam), {b['relative_bound']:.1e} of the typical weight "
            f"(rms {b['rms_weight']:.3g}), so ||delta||/||theta|| stays under "
            f"{MIN_RELATIVE_UPDATE:g} (at ~1e-5 every accuracy stayed identical)"
        )
    if b["compute_dtype"] != "fp32" and b["changeable_share"] < MIN_CHANGEABLE_SHARE:
        reasons.append(
            f"in {b['compute_dtype']} compute only {100 * b['changeable_share']:.2f}% of the "
            f"weights can change their {b['compute_dtype']} value (a median weight "
            f"{b['median_abs_weight']:.3g} has a {b['compute_dtype']} step of "
            f"{b['median_ulp']:.2e})"
        )
    return "; ".join(reasons) or None


def change_stats(
    start: Mapping[str, Tensor], end: Mapping[str, Tensor], compute_dtype: str = "fp32"
) -> dict:
    """How far ``end`` moved from ``start`` over the names of ``start`` (trainable weights):
    ``relative_change`` = ||delta|| / ||theta_start||, ``changed_share`` (weights whose fp32
    value differs), ``changed_share_compute`` (whose value in the compute dtype differs: what
    a bf16 matmul sees), ``max_abs_change``, ``num_weights``."""
    d2 = t2 = 0.0
    n = changed = changed_c = 0
    biggest = 0.0
    low = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute_dtype]
    for name, a in start.items():
        if name not in end:
            raise KeyError(f"{name}: in the start weights but not in the end weights")
        if a.shape != end[name].shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} vs {tuple(end[name].shape)}")
        for x, y in zip(_chunks(a), _chunks(end[name]), strict=True):
            diff = y.double() - x.double()
            d2 += float((diff * diff).sum())
            t2 += float(x.double().square().sum())
            n += x.numel()
            changed += int((x != y).sum())
            changed_c += int((x.to(low) != y.to(low)).sum())
            if diff.numel():
                biggest = max(biggest, float(diff.abs().max()))
    return {
        "relative_change": math.sqrt(d2 / t2) if t2 > 0 else 0.0,
        "changed_share": changed / n if n else 0.0,
        "changed_share_compute": changed_c / n if n else 0.0,
        "compute_dtype": compute_dtype,
        "max_abs_change": biggest,
        "num_weights": n,
    }
