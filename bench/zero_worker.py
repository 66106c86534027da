"""One rank of ``bench/zero_memory.py`` (started by the ``deepspeed`` launcher, 2 CPU ranks).

Builds the engine exactly as a training run does (``alsace_ds.config.load_config`` ->
``ds_config.build_ds_config`` from ``ds_configs/zero*.json`` -> ``trainer.load_for_stage``, which
builds the model partitioned under ZeRO-3 -> ``trainer.build_engine`` with torch AdamW), runs
``--steps`` cross-entropy steps on random token ids, and writes this rank's memory figures to
``<out-dir>/rank<r>.json``. Not meant to be run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def _rss() -> dict[str, int]:
    """Current RSS and USS (unique pages: excludes shared libraries and the shm buffers that
    every rank maps) in bytes; USS needs psutil."""
    out = {"rss": -1, "uss": -1}
    try:
        import psutil

        info = psutil.Process().memory_full_info()
        out.update(rss=int(info.rss), uss=int(info.uss))
    except Exception:  # noqa: BLE001 - psutil missing or smaps unreadable: RSS from /proc
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
    return out


def _peak_rss() -> int:
    """Peak RSS of this process so far (ru_maxrss is in KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def param_figures(module: torch.nn.Module) -> dict[str, float]:
    """Parameters held by this rank: under ZeRO-3 the local partition ``ds_tensor`` of every
    parameter (plus the full data of those currently gathered, i.e. persistent small ones);
    otherwise every parameter in full."""
    full = local_part = resident_full = 0
    full_bytes = local_bytes = 0
    partitioned = 0
    for p in module.parameters():
        numel = int(getattr(p, "ds_numel", p.numel()))
        full += numel
        full_bytes += numel * p.element_size()
        if hasattr(p, "ds_tensor"):
            partitioned += 1
            part = int(p.ds_tensor.numel())
            local_part += part
            local_bytes += _tensor_bytes(p.ds_tensor)
            if p.data.numel() > 0:  # gathered right now (persistent, below the threshold)
                resident_full += int(p.data.numel())
                local_bytes += _tensor_bytes(p.data)
        else:
            local_part += numel
            local_bytes += numel * p.element_size()
    return {
        "full_numel": full,
        "full_bytes": full_bytes,
        "partition_numel": local_part,
        "partitioned_params": partitioned,
        "resident_gathered_numel": resident_full,
        "held_bytes": local_bytes,
        "partition_share": local_part / full if full else 0.0,
    }


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def optimizer_figures(engine, module: torch.nn.Module) -> dict[str, float]:
    """The torch optimizer under DeepSpeed's wrapper: its state (AdamW exp_avg, exp_avg_sq,
    step) and the fp32 master weights it updates, counted only when they are a separate copy
    (ZeRO 1/2: ``single_partition_of_fp32_groups``, a clone of this rank's partition; ZeRO-3:
    ``fp32_partitioned_groups_flat``, which in fp32 without offload IS the parameter partition
    and with offload a copy; no ZeRO: the model's own parameters)."""
    wrapper = engine.optimizer
    base = wrapper
    while not isinstance(base, torch.optim.Optimizer) and hasattr(base, "optimizer"):
        base = base.optimizer
    state_bytes = 0
    for state in base.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                state_bytes += _tensor_bytes(v)
    model_storage = {_storage(p) for p in module.parameters() if p.data.numel() > 0}
    model_storage |= {_storage(p.ds_tensor) for p in module.parameters() if hasattr(p, "ds_tensor")}
    for name in ("fp16_partitioned_groups_flat", "bit16_groups_flat"):
        model_storage |= {_storage(t) for t in getattr(wrapper, name, None) or [] if t.numel()}
    masters = getattr(wrapper, "fp32_partitioned_groups_flat", None)
    if masters is None:
        masters = getattr(wrapper, "single_partition_of_fp32_groups", None)
    if masters is None:
        masters = [p for g in base.param_groups for p in g["params"]]
    master_bytes = master_numel = shared_numel = 0
    for t in masters:
        if _storage(t) in model_storage:
            shared_numel += t.numel()
            continue
        master_bytes += _tensor_bytes(t)
        master_numel += t.numel()
    return {
        "wrapper": type(wrapper).__name__,
        "optimizer": type(base).__name__,
        "state_bytes": state_bytes,
        "master_numel": master_numel,
        "master_bytes": master_bytes,
        "master_shared_with_params_numel": shared_numel,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--local_rank", type=int, default=None)  # passed by the deepspeed launcher
    p.add_argument("--model-path", required=True)
    p.add_argument("--template", required=True)
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--labels", type=int, default=3)
    p.add_argument("--persistence-threshold", type=int, default=100000)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    mem = {"start": _rss()}
    from alsace_ds import parallel
    from alsace_ds.config import load_config
    from alsace_ds.engine.ds_config import build_ds_config
    from alsace_ds.engine.trainer import build_engine, load_for_stage
    from alsace_ds.tools.shm_cleanup import unlink_own_buffer

    ctx = parallel.init_distributed(timeout_s=300.0)
    cfg = load_config(
        None,
        [
            f"deepspeed.config={args.template}",
            f"deepspeed.zero_stage={args.stage}",
            f"deepspeed.param_persistence_threshold={args.persistence_threshold}",
            "model.family=xlmr",
            f"model.name_or_path={args.model_path}",
            "model.dtype=fp32",
            f"stage0.micro_batch={args.micro_batch}",
        ],
    )
    ds_config = build_ds_config(cfg, cfg.stage0, ctx.world_size)
    mem["after_init"] = _rss()
    torch.manual_seed(args.seed)  # a freshly initialised head is the same on every run
    scorer, tok, _ = load_for_stage("xlmr", args.model_path, args.labels, None, 0.0, ds_config)
    mem["after_load"] = _rss()
    peak_after_load = _peak_rss()
    engine = build_engine(scorer, ds_config, lr=1e-5, weight_decay=0.01, total_steps=100,
                          warmup_steps=0)  # fmt: skip
    mem["after_engine"] = _rss()

    gen = torch.Generator().manual_seed(1000 * args.seed + ctx.rank)
    special = torch.tensor(sorted(set(tok.all_special_ids)))
    step_s, losses = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, len(tok), (args.micro_batch, args.seq_len), generator=gen)
        ids[torch.isin(ids, special)] = tok.unk_token_id or 0
        ids[:, 0] = tok.cls_token_id if tok.cls_token_id is not None else ids[:, 0]
        mask = torch.ones_like(ids)
        labels = torch.randint(0, args.labels, (args.micro_batch,), generator=gen)
        t0 = time.perf_counter()
        logits = engine(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        engine.backward(loss)
        engine.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    mem["after_steps"] = _rss()

    result = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "zero_stage": int(ds_config["zero_optimization"]["stage"]),
        "offload": {
            k: ds_config["zero_optimization"].get(k, {}).get("device")
            for k in ("offload_param", "offload_optimizer")
            if k in ds_config["zero_optimization"]
        },
        "peak_rss_bytes": _peak_rss(),
        "peak_rss_after_load_bytes": peak_after_load,
        "rss": mem,
        "params": param_figures(engine.module),
        "optimizer": optimizer_figures(engine, engine.module),
        "step_seconds": step_s,
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(result, indent=2))
    parallel.barrier(ctx)
    unlink_own_buffer(ctx.rank)
    parallel.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
