"""Launch real multi-process gloo jobs for tests (``DS_ACCELERATOR=cpu``, one process per rank).

The parent side (``launch``) starts ``world_size`` Python processes with the torchrun-style
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), waits with a deadline,
kills only the processes it started, and removes the ``/dev/shm`` buffers of its port
(:mod:`alsace_ds.tools.procs`). Run as a script, this file is the worker for test_dist_selection.py.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

from alsace_ds.parallel import free_port
from alsace_ds.tools import procs

REPO = Path(__file__).resolve().parent.parent


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.update(extra or {})
    return env


def run_code(code: str, *args: str, timeout: float = 300) -> procs.Finished:
    """``python -c code args...`` as a world of one on a free port, in its own process group
    (:func:`alsace_ds.tools.procs.run`: stdout and stderr in ``output``), removing the
    shared-memory buffers it leaves."""
    port = free_port()
    env = child_env({"MASTER_PORT": str(port)})
    return procs.run([sys.executable, "-c", code, *args], env, timeout, cwd=REPO, port=port)


# Prepended to a run_code snippet: a one-rank ZeRO engine (stage 2 or 3, AdamW at 1e-3) around
# a tiny random XLM-R classifier built into `folder`; returns (engine, tokenizer, module).
TINY_ENGINE = """
from alsace_ds.engine.trainer import build_engine, load_for_stage
from alsace_ds.models.tiny import build_tiny_model

def tiny_engine(folder, stage):
    path = build_tiny_model(folder, "xlmr", ["a", "b", "c"], ["x", "y"])
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
          "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    scorer, tok, _ = load_for_stage("xlmr", str(path), 2, None, None, ds)
    return build_engine(scorer, ds, 1e-3, 0.0, 10, 0), tok, scorer
"""


def shm_op_cached() -> bool:
    """True when DeepSpeed's CPU shm comm op is already JIT-built in the extension cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    return bool(glob.glob(os.path.join(root, "**", "deepspeed_shm_comm*.so"), recursive=True))


def prebuild_shm_op(timeout_s: float = 300.0) -> None:
    """Build the shm op once in one process, so ranks do not race to JIT-compile it."""
    if shm_op_cached():
        return
    code = (
        "from deepspeed.accelerator import get_accelerator;"
        "get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
    )
    subprocess.run(
        [sys.executable, "-c", code], env=child_env(), check=True, timeout=timeout_s, cwd=REPO
    )


def launch(
    world_size: int, args: list[str], log_dir: Path, timeout_s: float = 180.0
) -> list[tuple[int, str]]:
    """Run this file as a worker on ``world_size`` ranks; returns [(returncode, log)] per rank.

    Each rank is its own process group (:mod:`alsace_ds.tools.procs`); ranks still running at
    the deadline are killed (returncode -9), and the job's ``/dev/shm`` buffers removed.
    """
    port = free_port()
    jobs: list[procs.Job] = []
    try:
        for rank in range(world_size):
            env = child_env({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                             "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": str(port)})  # fmt: skip
            cmd = [sys.executable, str(Path(__file__).resolve()), *args]
            jobs.append(procs.start(cmd, env, log=log_dir / f"rank{rank}.log", port=port))
        deadline = time.monotonic() + timeout_s
        for job in jobs:
            try:
                job.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for job in jobs:
            job.kill()
    return [(job.proc.returncode, job.output()) for job in jobs]


# ---------------------------------------------------------------- worker side


def _run_cases(spec_path: str, out_dir: str) -> None:
    import torch

    from alsace_ds import parallel
    from alsace_ds.method.selection import select_from_views

    spec = torch.load(spec_path)
    ctx = parallel.init_distributed(timeout_s=float(spec.get("timeout_s", 60.0)))
    assert ctx.world_size == int(os.environ["WORLD_SIZE"]), ctx
    assert ctx.rank == int(os.environ["RANK"]) and ctx.distributed, ctx
    results: dict = {"ctx": (ctx.rank, ctx.world_size, ctx.local_rank, str(ctx.device))}

    if spec.get("die_rank") is not None:
        if ctx.rank == spec["die_rank"]:
            if spec.get("die_mode") == "stall":  # alive but never joins
                time.sleep(2 * ctx.timeout_s)
            os._exit(0)  # leave without joining the collective
        parallel.all_reduce_sum(torch.ones(3), ctx)  # must fail, not hang
        raise SystemExit("collective with a dead peer returned")

    # Collective primitives.
    local = torch.tensor([ctx.rank + 1, 10 * (ctx.rank + 1)], dtype=torch.int64)
    reduced = parallel.all_reduce_sum(local, ctx)
    results["all_reduce_int64"] = reduced.tolist()
    results["input_untouched"] = local.tolist() == [ctx.rank + 1, 10 * (ctx.rank + 1)]
    results["all_reduce_float64"] = parallel.all_reduce_sum(
        torch.tensor([0.1 * ctx.rank], dtype=torch.float64), ctx
    ).tolist()
    results["broadcast"] = parallel.broadcast_object({"from": ctx.rank}, ctx, src=0)
    results["broadcast_last"] = parallel.broadcast_object(ctx.rank * 7, ctx, src=ctx.world_size - 1)
    results["gather"] = parallel.all_gather_object(f"r{ctx.rank}", ctx)
    # a decision read by rank 0 only (each rank would read its own rank here)
    results["decide"] = parallel.decide(lambda: {"read_by": ctx.rank}, ctx)
    part = torch.arange(3, dtype=torch.float32) + 10 * ctx.rank  # a ZeRO-3-like partition
    results["partitions"] = parallel.all_gather_partitions(
        part, 3 * ctx.world_size - 1, ctx
    ).tolist()
    parallel.barrier(ctx)

    reduce = parallel.reducer(ctx)
    cases = {}
    for case in spec["cases"]:
        probs, owner = case["probs"], case["owner"]
        n, t, c = probs.shape
        ex_all = torch.arange(n).repeat_interleave(t)
        lg_all = torch.arange(t).repeat(n)
        mine = owner == ctx.rank
        ex, lg = ex_all[mine], lg_all[mine]
        sel = select_from_views(
            probs[ex, lg].reshape(-1, c),
            ex,
            lg,
            n,
            case["languages"],
            threshold=case.get("threshold"),
            reduce=reduce,
        )
        cases[case["name"]] = {
            "num_views": int(mine.sum()),
            "pseudo_labels": sel.pseudo_labels.tolist(),
            "confidence": sel.confidence.tolist(),
            "scores": sel.scores.tolist(),
            "agreement": sel.agreement.tolist(),
            "dict": sel.to_dict(),
        }
    results["cases"] = cases
    torch.save(results, os.path.join(out_dir, f"rank{ctx.rank}.pt"))
    parallel.barrier(ctx)
    parallel.shutdown()


if __name__ == "__main__":
    _run_cases(sys.argv[1], sys.argv[2])
