"""Plan a run's ZeRO stage: per-GPU memory for parameters, gradients and optimizer state.

``python -m alsace_ds.tools.plan --model xlm-roberta-large --nodes 2 --gpus-per-node 8 \
--gpu-mem 80``
prints, for ZeRO 0, 1, 2, 2 + optimizer offload, 3, 3 + optimizer offload and 3 + parameter and
optimizer offload, the estimated per-GPU bytes of the *model states*, the CPU memory per node
that offload needs, which options fit in ``--gpu-mem`` GiB after a headroom, and a one-line
recommendation.

Formulas (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models", SC'20, sec. 3.1 and 5; Ψ = parameter count, N = data-parallel world = nodes x GPUs):

- fp32 Adam (``--dtype fp32``, the default): 4Ψ params + 4Ψ grads + 8Ψ optimizer state (two
  fp32 moments; the parameters are their own master copy). This is what alsace_ds trains with
  in BOTH its dtypes: ``model.dtype: bf16`` is bf16 *compute* (DeepSpeed's torch_autocast) on
  fp32 parameters, so that the evaluated and exported model is the master (README,
  "Precision"); only activations and ZeRO-3's parameter gathers are 16-bit.
- 16-bit mixed precision Adam (``--dtype bf16``, a what-if: DeepSpeed's bf16 mode, the ZeRO
  paper's accounting): 2Ψ params + 2Ψ grads + KΨ optimizer state with K = 12 (fp32 master
  weights 4 + Adam momentum 4 + variance 4).

Per GPU, with P, G, K the three byte multipliers above:

==========================  ==========  ==========  ==========  ================================
option                      params      grads       optimizer   CPU per node (offload)
==========================  ==========  ==========  ==========  ================================
ZeRO-0 (plain DDP)          PΨ          GΨ          KΨ          -
ZeRO-1                      PΨ          GΨ          KΨ/N        -
ZeRO-2                      PΨ          GΨ/N        KΨ/N        -
ZeRO-2 + offload optimizer  PΨ          0           0           16Ψ/N x GPUs per node
ZeRO-3                      PΨ/N        GΨ/N        KΨ/N        -
ZeRO-3 + offload optimizer  PΨ/N        0           0           16Ψ/N x GPUs per node
ZeRO-3 + offload params     0           0           0           (16+P)Ψ/N x GPUs per node
==========================  ==========  ==========  ==========  ================================

With the optimizer offloaded (ZeRO-Offload), each rank's CPU holds the fp32 parameter partition,
the two Adam moments and the fp32 gradient partition, 4 + 8 + 4 = 16 bytes per parameter of the
partition, in both dtypes (the GPU keeps only reduction buckets, counted in the headroom).
ZeRO-3 also gathers whole layers on the GPU: a working set of 2 x P x (largest layer's
parameters) (gathered parameters and their gradients; DeepSpeed's ``4 * largest_layer_params``
in mixed precision) is added to the ZeRO-3 rows.

DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs`` and
``estimate_zero3_model_states_mem_needs``, the functions that DeepSpeed's
``..._all_cold`` helpers print) are shown next to these numbers for the ZeRO-2/3 rows. They
assume 16-bit mixed precision, count 18 bytes/param of partitioned state (2 grads + 4 fp32
grads + 4 master + 8 moments), and their CPU column includes a 1.5x buffer factor and, without
offload, the fp32 model each rank builds on CPU before moving it. The "fits" decision uses the
larger of the two GPU numbers, so it is conservative.

Only model states are estimated. Activations (batch x sequence x hidden x layers), temporary
buffers, CUDA context and fragmentation come on top: that is what ``--headroom`` (default 20%
of the GPU) reserves. Activation checkpointing and a smaller micro-batch reduce them.

The parameter count comes from ``--params N``, a built-in table of known checkpoints
(:data:`KNOWN_MODELS`, whose counts are computed from the published configs by instantiating
the model on the ``meta`` device, so no weights and no network), a local Hugging Face folder
(``--model PATH``, counted the same way), or the project YAML (``--config``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alsace_ds.models.families import FAMILIES

GIB = 2**30
DTYPES = ("bf16", "fp32")

# (label, stage, offload_optimizer, offload_param), in table order.
OPTIONS: tuple[tuple[str, int, bool, bool], ...] = (
    ("ZeRO-0", 0, False, False),
    ("ZeRO-1", 1, False, False),
    ("ZeRO-2", 2, False, False),
    ("ZeRO-2 +off-opt", 2, True, False),
    ("ZeRO-3", 3, False, False),
    ("ZeRO-3 +off-opt", 3, True, False),
    ("ZeRO-3 +off-opt+param", 3, True, True),
)
# Preference of the recommendation: the lowest stage without offload, then offload (slow: the
# optimizer step runs on CPU and every step moves gradients/parameters over PCIe).
PREFERENCE: tuple[str, ...] = (
    "ZeRO-0",
    "ZeRO-1",
    "ZeRO-2",
    "ZeRO-3",
    "ZeRO-2 +off-opt",
    "ZeRO-3 +off-opt",
    "ZeRO-3 +off-opt+param",
)

_XLMR = dict(
    model_type="xlm-roberta",
    vocab_size=250002,
    max_position_embeddings=514,
    type_vocab_size=1,
)
_MT5 = dict(
    model_type="mt5",
    vocab_size=250112,
    d_kv=64,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)

# Published configs (config.json of each Hub repository) and the parameter counts reported by
# their papers (XLM-R: Conneau et al. 2020, table 7; mT5: Xue et al. 2021, table 1). The count
# used is computed from the config (``known_model_params``); the test checks it is within 3% of
# the reported one. XLM-R is counted with the project's classification head (2 labels), mT5 as
# MT5ForConditionalGeneration with its separate (untied) lm_head.
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "xlm-roberta-base": dict(
        family="xlmr",
        reported=278e6,
        config=dict(
            _XLMR,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
        ),
    ),
    "xlm-roberta-large": dict(
        family="xlmr",
        reported=560e6,
        config=dict(
            _XLMR,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
        ),
    ),
    "google/mt5-small": dict(
        family="mt5",
        reported=300e6,
        config=dict(_MT5, d_model=512, d_ff=1024, num_heads=6, num_layers=8),
    ),
    "google/mt5-base": dict(
        family="mt5",
        reported=580e6,
        config=dict(_MT5, d_model=768, d_ff=2048, num_heads=12, num_layers=12),
    ),
    "google/mt5-large": dict(
        family="mt5",
        reported=1.2e9,
        config=dict(_MT5, d_model=1024, d_ff=2816, num_heads=16, num_layers=24),
    ),
    "google/mt5-xl": dict(
        family="mt5",
        reported=3.7e9,
        config=dict(_MT5, d_model=2048, d_ff=5120, num_heads=32, num_layers=24),
    ),
    "google/mt5-xxl": dict(
        family="mt5",
        reported=13e9,
        config=dict(_MT5, d_model=4096, d_ff=10240, num_heads=64, num_layers=24),
    ),
}
ALIASES = {
    "FacebookAI/xlm-roberta-base": "xlm-roberta-base",
    "FacebookAI/xlm-roberta-large": "xlm-roberta-large",
    "mt5-small": "google/mt5-small",
    "mt5-base": "google/mt5-base",
    "mt5-large": "google/mt5-large",
    "mt5-xl": "google/mt5-xl",
    "mt5-xxl": "google/mt5-xxl",
}


class PlanError(ValueError):
    """A model that cannot be counted, or invalid plan arguments."""


@dataclass(frozen=True)
class ParamCount:
    """Total parameters and the largest single module's own parameters (ZeRO-3 working set)."""

    total: int
    largest_layer: int
    source: str


# --------------------------------------------------------------------------------------------
# Pure estimates
# --------------------------------------------------------------------------------------------


def bytes_per_param(dtype: str) -> tuple[int, int, int]:
    """``(params, grads, optimizer)`` bytes per parameter for Adam: 2/2/12 mixed, 4/4/8 fp32."""
    if dtype == "bf16":
        return 2, 2, 12
    if dtype == "fp32":
        return 4, 4, 8
    raise PlanError(f"dtype must be one of {DTYPES}, got {dtype!r}")


def estimate(
    num_params: int,
    stage: int,
    offload_param: bool,
    offload_optimizer: bool,
    dp_world: int,
    dtype: str = "bf16",
    *,
    gpus_per_node: int = 1,
    largest_layer_params: int = 0,
) -> dict[str, float]:
    """Estimated model-state memory (bytes) of one option; see the module docstring.

    Returns ``params``, ``grads``, ``optimizer``, ``working`` (ZeRO-3 gathered layer) and
    ``gpu_total`` per GPU, and ``cpu_per_node`` (offload only; 0 otherwise).
    """
    if stage not in (0, 1, 2, 3):
        raise PlanError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if offload_optimizer and stage < 2:
        raise PlanError("optimizer offload needs ZeRO stage 2 or 3")
    if offload_param and (stage != 3 or not offload_optimizer):
        raise PlanError("parameter offload needs ZeRO stage 3 with optimizer offload")
    if num_params <= 0 or dp_world < 1 or gpus_per_node < 1:
        raise PlanError("num_params, dp_world and gpus_per_node must be positive")
    p, g, k = bytes_per_param(dtype)
    psi, n = float(num_params), float(dp_world)
    params = p * psi / n if stage == 3 else p * psi
    grads = g * psi / n if stage >= 2 else g * psi
    optim = k * psi / n if stage >= 1 else k * psi
    cpu_rank = 0.0
    if offload_optimizer:
        grads = optim = 0.0
        cpu_rank += 16 * psi / n  # fp32 params + 2 moments + fp32 grads of the partition
    if offload_param:
        params = 0.0
        cpu_rank += p * psi / n
    working = 2.0 * p * largest_layer_params if stage == 3 else 0.0
    return {
        "params": params,
        "grads": grads,
        "optimizer": optim,
        "working": working,
        "gpu_total": params + grads + optim + working,
        "cpu_per_node": cpu_rank * gpus_per_node,
    }


def deepspeed_estimate(
    num_params: int,
    stage: int,
    offload_param: bool,
    offload_optimizer: bool,
    nodes: int,
    gpus_per_node: int,
    largest_layer_params: int = 0,
) -> tuple[float, float] | None:
    """DeepSpeed's ``(gpu bytes, cpu bytes per node)`` for a ZeRO-2/3 option; ``None`` for
    stages 0/1 or when DeepSpeed cannot be imported. ZeRO-3 assumes ``zero.Init``."""
    if stage < 2:
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if stage == 2:
                from deepspeed.runtime.zero.stage_1_and_2 import (
                    estimate_zero2_model_states_mem_needs,
                )

                cpu, gpu = estimate_zero2_model_states_mem_needs(
                    num_params, gpus_per_node, nodes, cpu_offload=offload_optimizer
                )
            else:
                from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    num_params,
                    largest_layer_params,
                    gpus_per_node,
                    nodes,
                    cpu_offload=offload_optimizer,
                    cpu_offload_params=offload_param,
                    zero_init=True,
                )
    except Exception:  # noqa: BLE001 - the cross-check is optional
        return None
    return float(gpu), float(cpu)


def plan_rows(
    num_params: int,
    nodes: int,
    gpus_per_node: int,
    dtype: str = "bf16",
    *,
    largest_layer_params: int = 0,
    gpu_mem_gib: float = 80.0,
    headroom: float = 0.2,
    cpu_mem_gib: float | None = None,
    use_deepspeed: bool = True,
) -> list[dict[str, Any]]:
    """One row per option of :data:`OPTIONS`: our estimate, DeepSpeed's, and whether it fits.

    An option fits when the larger of the two GPU estimates is at most
    ``gpu_mem_gib * (1 - headroom)`` GiB and, if ``cpu_mem_gib`` is given, its CPU need per
    node is at most that.
    """
    if not 0.0 <= headroom < 1.0:
        raise PlanError(f"headroom must be in [0, 1), got {headroom!r}")
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError("nodes and gpus_per_node must be at least 1")
    budget = gpu_mem_gib * GIB * (1.0 - headroom)
    rows = []
    for label, stage, off_opt, off_param in OPTIONS:
        est = estimate(
            num_params,
            stage,
            off_param,
            off_opt,
            nodes * gpus_per_node,
            dtype,
            gpus_per_node=gpus_per_node,
            largest_layer_params=largest_layer_params,
        )
        ds = (
            deepspeed_estimate(
                num_params, stage, off_param, off_opt, nodes, gpus_per_node, largest_layer_params
            )
            if use_deepspeed
            else None
        )
        gpu_need = max(est["gpu_total"], ds[0] if ds else 0.0)
        fits = gpu_need <= budget
        if cpu_mem_gib is not None and est["cpu_per_node"] > cpu_mem_gib * GIB:
            fits = False
        rows.append(
            dict(
                label=label,
                stage=stage,
                offload_optimizer=off_opt,
                offload_param=off_param,
                **est,
                ds_gpu=ds[0] if ds else None,
                ds_cpu_per_node=ds[1] if ds else None,
                gpu_need=gpu_need,
                fits=fits,
            )
        )
    return rows


def recommend(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The preferred option that fits (:data:`PREFERENCE`: lowest stage, no offload first)."""
    by_label = {r["label"]: r for r in rows}
    for label in PREFERENCE:
        row = by_label.get(label)
        if row is not None and row["fits"]:
            return row
    return None


def min_gpus_for_zero3(
    num_params: int, dtype: str, gpu_mem_gib: float, headroom: float, largest_layer: int = 0
) -> int | None:
    """Smallest data-parallel world at which ZeRO-3 without offload fits (None: never)."""
    p, g, k = bytes_per_param(dtype)
    budget = gpu_mem_gib * GIB * (1.0 - headroom) - 2 * p * largest_layer
    if budget <= 0:
        return None
    return max(1, -(-int((p + g + k) * num_params) // int(budget)))


# --------------------------------------------------------------------------------------------
# Parameter counting
# --------------------------------------------------------------------------------------------


def _count_module(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    largest = max(
        (sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0
    )
    return int(total), int(largest)


def _model_class(family: str) -> Any:
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    return AutoModelForSeq2SeqLM if family == "mt5" else AutoModelForSequenceClassification


def _count_from_config(cfg: Any, family: str, untied_lm_head: bool) -> tuple[int, int]:
    """Instantiate on the meta device (no memory, no weights) and count."""
    import torch

    with torch.device("meta"):
        model = _model_class(family).from_config(cfg)
    total, largest = _count_module(model)
    lm_head = getattr(model, "lm_head", None)
    shared = getattr(model, "shared", None)
    if (
        untied_lm_head
        and lm_head is not None
        and shared is not None
        and lm_head.weight is shared.weight
    ):
        # transformers 5 builds mT5 with lm_head tied to the input embeddings; the real
        # checkpoints (and alsace_ds.models.tiny's) load it untied, so it is a second [V, d] matrix.
        total += int(lm_head.weight.numel())
    return total, largest


def _checkpoint_has_lm_head(folder: Path) -> bool:
    """Whether the saved weights hold a separate ``lm_head.weight`` (read from headers only)."""
    for index in folder.glob("*.index.json"):
        with open(index, encoding="utf-8") as fh:
            if "lm_head.weight" in json.load(fh).get("weight_map", {}):
                return True
    for st in folder.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(st), framework="pt") as fh:
            if "lm_head.weight" in fh.keys():
                return True
    return False


def infer_family(name: str, model_type: str | None = None) -> str:
    """``mt5`` for T5-like names/model types, else ``xlmr``."""
    text = (model_type or name).lower()
    return "mt5" if "t5" in text else "xlmr"


def known_model_params(name: str) -> ParamCount:
    """Count a built-in model from its published config on the meta device."""
    key = ALIASES.get(name, name)
    entry = KNOWN_MODELS[key]
    from transformers import AutoConfig

    kwargs = dict(entry["config"])
    model_type = kwargs.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kwargs)
    total, largest = _count_from_config(cfg, entry["family"], untied_lm_head=True)
    return ParamCount(total, largest, f"built-in config of {key}")


def local_model_params(folder: str | os.PathLike, family: str | None = None) -> ParamCount:
    """Exact count of a local Hugging Face folder: its config on the meta device."""
    from transformers import AutoConfig

    folder = Path(folder)
    cfg = AutoConfig.from_pretrained(folder)
    family = family or infer_family(str(folder), getattr(cfg, "model_type", None))
    untied = family == "mt5" and _checkpoint_has_lm_head(folder)
    total, largest = _count_from_config(cfg, family, untied_lm_head=untied)
    return ParamCount(total, largest, f"config of {folder}")


def resolve_params(
    model: str | None, params: float | None = None, family: str | None = None
) -> ParamCount:
    """``--params`` if given, else a local folder, else the built-in table; no network."""
    if params is not None:
        if params <= 0:
            raise PlanError(f"--params must be positive, got {params!r}")
        return ParamCount(int(params), 0, "--params")
    if not model:
        raise PlanError("give --model NAME|PATH, --params N or --config FILE")
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{model!r} is a folder without config.json")
        return local_model_params(path, family)
    if ALIASES.get(model, model) in KNOWN_MODELS:
        return known_model_params(model)
    known = ", ".join(KNOWN_MODELS)
    raise PlanError(
        f"unknown model {model!r}: it is not a local folder and not in the built-in table "
        f"({known}), and the plan never downloads configs. Pass --params N (the parameter "
        f"count, e.g. --params 560e6) or --model PATH to a local Hugging Face folder."
    )


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _fmt(x: float | None, unit: float) -> str:
    return "-" if x is None else f"{x / unit:.2f}"


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_plan(
    count: ParamCount,
    rows: list[dict[str, Any]],
    *,
    model: str,
    nodes: int,
    gpus_per_node: int,
    dtype: str,
    gpu_mem_gib: float,
    headroom: float,
    stage: int | None = None,
) -> str:
    """The human-readable table, caveats and recommendation."""
    world = nodes * gpus_per_node
    # GiB, or MiB for tiny models whose numbers would all print as 0.00 GiB.
    big = max(r["gpu_total"] for r in rows) >= 0.1 * GIB
    unit, uname = (GIB, "GiB") if big else (2**20, "MiB")
    lines = [
        f"model: {model} | {count.total:,} params ({_human(count.total)}), largest layer "
        f"{count.largest_layer:,} [{count.source}]",
        f"setup: {nodes} node(s) x {gpus_per_node} GPU(s) = {world} ranks, {gpu_mem_gib:g} GiB "
        f"per GPU, dtype {dtype}, headroom {headroom:.0%} -> budget "
        f"{gpu_mem_gib * (1 - headroom):.2f} GiB for model states",
        "",
        f"{'option (' + uname + ')':<23}{'params':>8}{'grads':>8}{'optim':>8}{'layer':>8}"
        f"{'GPU tot':>9}{'CPU/node':>10}{'DS GPU':>9}{'DS CPU':>9}  fits",
    ]
    for r in rows:
        mark = "*" if stage is not None and r["stage"] == stage else " "
        cpu = r["cpu_per_node"] if r["offload_optimizer"] else None
        lines.append(
            f"{mark}{r['label']:<22}{_fmt(r['params'], unit):>8}{_fmt(r['grads'], unit):>8}"
            f"{_fmt(r['optimizer'], unit):>8}{_fmt(r['working'], unit):>8}"
            f"{_fmt(r['gpu_total'], unit):>9}{_fmt(cpu, unit):>10}"
            f"{_fmt(r['ds_gpu'], unit):>9}{_fmt(r['ds_cpu_per_node'], unit):>9}  "
            f"{'yes' if r['fits'] else 'no'}"
        )
    lines += [
        "",
        f"{uname} per GPU (CPU/node: host RAM per node for offload). 'layer': ZeRO-3 gathered "
        "largest layer.",
        "DS: DeepSpeed's estimate_zero{2,3}_model_states_mem_needs (16-bit mixed precision, "
        "zero.Init, CPU x1.5 buffer).",
        "Caveat: model states only. Activations (micro-batch x seq x hidden x layers), "
        "buffers and CUDA context",
        f"come on top; the {headroom:.0%} headroom is reserved for them. Use activation "
        "checkpointing / a smaller micro-batch if they do not fit.",
    ]
    if stage is not None:
        chosen = [r for r in rows if r["stage"] == stage]
        ok = [r["label"] for r in chosen if r["fits"]]
        lines.append(
            f"requested ZeRO-{stage}: "
            + (f"fits ({', '.join(ok)})" if ok else "does not fit in any offload variant")
        )
    best = recommend(rows)
    if best is not None:
        lines.append(
            f"recommendation: {best['label']} (needs {best['gpu_need'] / GIB:.2f} GiB of "
            f"{gpu_mem_gib * (1 - headroom):.2f} GiB per GPU)"
        )
    else:
        need = min_gpus_for_zero3(count.total, dtype, gpu_mem_gib, headroom, count.largest_layer)
        hint = f"; ZeRO-3 needs at least {need} GPUs of this size" if need else ""
        lines.append(f"recommendation: nothing fits{hint}")
    return "\n".join(lines)


def _parse_count(text: str) -> float:
    """``560e6``, ``560M``, ``1.2B``, ``13000000000``."""
    t = text.strip().upper().replace("_", "").replace(",", "")
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(t[-1:], None)
    try:
        return float(t[:-1]) * mult if mult else float(t)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r}") from e


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m alsace_ds.tools.plan",
        description="Estimate per-GPU ZeRO memory (params, grads, optimizer state) and pick a "
        "stage/offload that fits.",
    )
    ap.add_argument("--model", help="built-in name (e.g. xlm-roberta-large) or local HF folder")
    ap.add_argument("--params", type=_parse_count, help="parameter count (560e6, 1.2B, ...)")
    ap.add_argument(
        "--largest-layer",
        type=_parse_count,
        default=None,
        help="largest module's params, for the ZeRO-3 working set (with --params)",
    )
    ap.add_argument("--config", help="project YAML: model name/family/dtype taken from it")
    ap.add_argument("--family", choices=FAMILIES, help="model family (default: inferred)")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=1)
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--cpu-mem", type=float, default=None, help="GiB of host RAM per node")
    ap.add_argument("--headroom", type=float, default=0.2, help="fraction kept for activations")
    ap.add_argument("--stage", type=int, choices=(0, 1, 2, 3), help="the stage you plan to use")
    ap.add_argument(
        "--dtype",
        choices=DTYPES,
        help="fp32 (default: the states alsace_ds keeps, in fp32 and bf16-compute runs alike) "
        "or bf16 (16-bit weights, DeepSpeed's bf16 mode: a what-if)",
    )
    ap.add_argument("--no-deepspeed", action="store_true", help="skip DeepSpeed's estimators")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    return ap


def _from_config(path: str) -> tuple[str, str, str]:
    """``(model name or folder, family, dtype)`` from the project's YAML."""
    from alsace_ds.config import EMBEDDED, load_config

    cfg = load_config(path)
    name = cfg.model.name_or_path
    if name == EMBEDDED:
        from alsace_ds.data.embedded import build_embedded
        from alsace_ds.data.tasks import cache_dir

        name = str(build_embedded(cache_dir(), cfg.model.family).model_dir)
    return name, cfg.model.family, "fp32"  # fp32 states whatever model.dtype computes in


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, family, dtype = args.model, args.family, args.dtype
        if args.config:
            c_model, c_family, c_dtype = _from_config(args.config)
            model, family, dtype = model or c_model, family or c_family, dtype or c_dtype
        dtype = dtype or "fp32"
        count = resolve_params(model, args.params, family)
        if args.largest_layer is not None:
            count = ParamCount(count.total, int(args.largest_layer), count.source)
        rows = plan_rows(
            count.total,
            args.nodes,
            args.gpus_per_node,
            dtype,
            largest_layer_params=count.largest_layer,
            gpu_mem_gib=args.gpu_mem,
            headroom=args.headroom,
            cpu_mem_gib=args.cpu_mem,
            use_deepspeed=not args.no_deepspeed,
        )
    except (PlanError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        best = recommend(rows)
        print(
            json.dumps(
                {
                    "params": count.total,
                    "largest_layer": count.largest_layer,
                    "rows": rows,
                    "recommendation": best["label"] if best else None,
                },
                indent=1,
            )
        )
        return 0
    print(
        format_plan(
            count,
            rows,
            model=model or "(--params)",
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            dtype=dtype,
            gpu_mem_gib=args.gpu_mem,
            headroom=args.headroom,
            stage=args.stage,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
