"""DeepSpeed JSON: the files in ``ds_configs/`` say "auto" wherever our config decides.

This module is the ONE place that fills them (HF's ``fill_match`` idea): every "auto"
must be filled, a key our config decides that the JSON leaves out is written in (a user's
JSON without ``gradient_clipping``, ``bf16`` or the batch keys still gets the config's
values), and a concrete value in the JSON that disagrees with our config is an error rather
than a silent winner. The batch identity
``train_batch_size = micro * grad_accum * data_parallel_world`` is asserted here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from alsace_ds.config import Config, ConfigError, DistillConfig, Stage0Config, resolve_path


def load_template(path: str | Path) -> dict[str, Any]:
    p = resolve_path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError([f"{p}: cannot read DeepSpeed JSON ({exc})"], str(p)) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"{p}: top level must be an object"], str(p))
    return data


def _get(d: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        out: list[str] = []
        for k, v in node.items():
            out += _find_auto(v, f"{prefix}{k}.")
        return out
    return [prefix[:-1]] if node == "auto" else []


def fill_auto(
    template: dict[str, Any],
    values: dict[str, Any],
    source: str,
    decided_by: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``values`` at their dotted keys where the template says "auto" or leaves the key
    out; report unfilled autos and concrete values that disagree, all at once.
    ``decided_by[key]`` names the config field behind a value (for the message)."""
    cfg = copy.deepcopy(template)
    problems: list[str] = []
    for key, value in values.items():
        present, current = _get(cfg, key)
        if not present or current == "auto":
            try:
                _set(cfg, key, value)
            except (AttributeError, TypeError):  # e.g. "bf16": true instead of an object
                problems.append(f"{source}: cannot write '{key}': a section on its path is "
                                "not an object")  # fmt: skip
            continue
        if current != value:
            field = (decided_by or {}).get(key)
            problems.append(
                f"{source}: '{key}' is {current!r} but our config says {value!r}"
                + (f" ({field})" if field else "")
                + ' (write "auto" there to let the config decide)'
            )
    problems += [f"{source}: '{k}' is \"auto\" but nothing fills it" for k in _find_auto(cfg)]
    if problems:
        raise ConfigError(problems, source)
    return cfg


#: Written only where the template has the key (or uses ZeRO-3, the stage that reads it).
STAGE3_KEY = "zero_optimization.stage3_param_persistence_threshold"


def decided_by(stage_name: str) -> dict[str, str]:
    """The config field behind each value of :func:`stage_values` (named in mismatches)."""
    return {
        "train_micro_batch_size_per_gpu": f"{stage_name}.micro_batch",
        "gradient_accumulation_steps": f"{stage_name}.grad_accum",
        "train_batch_size": f"{stage_name}.micro_batch x grad_accum x data-parallel ranks",
        "gradient_clipping": "deepspeed.gradient_clipping",
        "bf16.enabled": "model.dtype: bf16 is torch_autocast, never DeepSpeed's bf16",
        "fp16.enabled": "model.dtype: fp32 or bf16",
        "torch_autocast.enabled": "model.dtype",
        "torch_autocast.dtype": "model.dtype",
        STAGE3_KEY: "deepspeed.param_persistence_threshold",
    }


def stage_values(cfg: Config, stage: Stage0Config | DistillConfig, dp_world: int) -> dict[str, Any]:
    """The values our config decides, keyed by their dotted DeepSpeed path.

    ``model.dtype: bf16`` is bf16 *compute* with fp32 *parameters*: DeepSpeed's
    ``torch_autocast`` (the module stays fp32, its forward runs under ``torch.autocast``),
    never DeepSpeed's ``bf16`` mode, whose module holds a bf16 copy of the fp32 master
    weights. With that copy, evaluation and export would see only updates larger than half a
    bf16 step (~0.4% of a weight): at the paper's learning rates, none. With fp32 parameters
    the evaluated, kept and exported model IS the master (see README, "Precision")."""
    ds = cfg.deepspeed
    bf16 = cfg.model.resolved_dtype == "bf16"
    return {
        "train_micro_batch_size_per_gpu": stage.micro_batch,
        "gradient_accumulation_steps": stage.grad_accum,
        "train_batch_size": stage.micro_batch * stage.grad_accum * dp_world,
        "gradient_clipping": ds.gradient_clipping,
        "bf16.enabled": False,
        "fp16.enabled": False,
        "torch_autocast.enabled": bf16,
        "torch_autocast.dtype": "bfloat16",
        STAGE3_KEY: ds.param_persistence_threshold,
    }


def _refuse_bf16_weights(template: dict[str, Any], source: str) -> None:
    present, value = _get(template, "bf16.enabled")
    if present and value is True:
        raise ConfigError(
            [f"{source}: 'bf16.enabled' is true, which trains a bf16 copy of the weights and "
             "evaluates/exports it, losing every update below half a bf16 step; this trainer "
             "keeps fp32 weights and computes in bf16 with torch_autocast: set model.dtype=bf16 "
             "and write \"auto\" (or false) there"],
            source,
        )  # fmt: skip


def build_ds_config(
    cfg: Config, stage: Stage0Config | DistillConfig, dp_world: int
) -> dict[str, Any]:
    """The filled DeepSpeed config for one training stage on ``dp_world`` data-parallel ranks.

    DeepSpeed counts every rank as data parallel, so ``dp_world`` is the whole world even
    under view parallelism (where a view group of V ranks shares each micro-batch of
    examples and DeepSpeed's gradient average over all ranks equals the mean over groups)."""
    vp = getattr(stage, "view_parallel_size", 1)
    if vp == "auto":
        raise ValueError("view_parallel_size 'auto' is resolved by config.with_world first")
    if dp_world % vp:
        raise ConfigError(
            [f"distill.view_parallel_size: {vp} does not divide the world size {dp_world}"]
        )
    source = str(cfg.deepspeed.config)
    template = load_template(source)
    if cfg.deepspeed.zero_stage is not None:
        template.setdefault("zero_optimization", {})["stage"] = cfg.deepspeed.zero_stage
    _refuse_bf16_weights(template, source)
    values = stage_values(cfg, stage, dp_world)
    if _get(template, "zero_optimization.stage")[1] != 3 and not _get(template, STAGE3_KEY)[0]:
        del values[STAGE3_KEY]
    name = "stage0" if isinstance(stage, Stage0Config) else "distill"
    filled = fill_auto(template, values, source, decided_by(name))
    micro = filled["train_micro_batch_size_per_gpu"]
    accum = filled["gradient_accumulation_steps"]
    if filled["train_batch_size"] != micro * accum * dp_world:
        raise ConfigError(
            [
                f"{source}: train_batch_size {filled['train_batch_size']} != micro "
                f"{micro} x grad_accum {accum} x data-parallel world {dp_world}"
            ],
            source,
        )
    return filled


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
