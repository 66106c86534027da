"""Memory per rank under ZeRO 0, 1, 2, 3 and 3 + offload, 2 CPU ranks, the real launcher.

Each configuration runs in a fresh pair of processes, one after the other:
``deepspeed --num_gpus 2 bench/zero_worker.py ...`` with ``DS_ACCELERATOR=cpu`` and
``OMP_NUM_THREADS=1``. The worker builds the engine from the repository's
``ds_configs/zero{1,2,3,3_offload}.json`` through
``alsace_ds.engine.ds_config.build_ds_config`` (stage 0 = zero1.json with
``deepspeed.zero_stage=0``), loads the model with ``trainer.load_for_stage``
(partitioned at construction under ZeRO-3), wraps a torch AdamW with ``trainer.build_engine``
and runs ``--steps`` cross-entropy steps on random token ids. Per rank it reports:

- peak RSS (``getrusage`` ru_maxrss: the whole process, loading included) and RSS / USS
  (psutil) after loading, after building the engine and after the steps;
- the parameters held: every parameter in full under ZeRO 0-2; under ZeRO-3 the local
  partition ``param.ds_tensor`` (vs ``param.ds_numel``) plus the parameters kept gathered
  (below ``stage3_param_persistence_threshold``); the partition share should be ~50%;
- the optimizer's state (AdamW exp_avg + exp_avg_sq) and its fp32 master copies when they are
  separate tensors (ZeRO 1-3).

On this CPU machine "device" and "host" memory are the same RAM, so offload moves nothing out
of the process: it is measured for completeness, not expected to save memory here.
DeepSpeed's shm buffers of each run are removed after it, and stale ones at the end
(``python -m alsace_ds.tools.shm_cleanup``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import common

from alsace_ds.parallel import free_port
from alsace_ds.tools import procs

CONFIGS: dict[str, tuple[str, int]] = {  # name -> (template, ZeRO stage)
    "zero0": ("ds_configs/zero1.json", 0),
    "zero1": ("ds_configs/zero1.json", 1),
    "zero2": ("ds_configs/zero2.json", 2),
    "zero3": ("ds_configs/zero3.json", 3),
    "zero3_offload": ("ds_configs/zero3_offload.json", 3),
}
WORKER = Path(__file__).resolve().parent / "zero_worker.py"
MiB = 2**20


def launch(name: str, model_path: Path, args: argparse.Namespace, out_dir: Path) -> list[dict]:
    """One configuration on 2 fresh ranks; returns the ranks' JSON records."""
    template, stage = CONFIGS[name]
    port = free_port()
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [
        str(deepspeed) if deepspeed.exists() else "deepspeed",
        "--num_gpus", str(args.ranks), "--master_port", str(port), str(WORKER),
        "--model-path", str(model_path), "--template", template, "--stage", str(stage),
        "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
        "--seq-len", str(args.seq_len), "--labels", str(args.labels),
        "--persistence-threshold", str(args.persistence_threshold), "--out-dir", str(out_dir),
        "--seed", str(args.seed),
    ]  # fmt: skip
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(common.REPO), env.get("PYTHONPATH")])),
    )
    res = procs.run(cmd, env, args.timeout, cwd=common.REPO, port=port)
    log = res.output
    if res.timed_out:
        raise SystemExit(f"{name}: timed out after {args.timeout} s\n{log[-4000:]}")
    if res.returncode != 0:
        raise SystemExit(f"{name}: launcher exited {res.returncode}\n{log[-6000:]}")
    records = []
    for rank in range(args.ranks):
        f = out_dir / f"rank{rank}.json"
        if not f.is_file():
            raise SystemExit(f"{name}: rank {rank} wrote no result\n{log[-4000:]}")
        records.append(json.loads(f.read_text()))
    return records


def summarize(name: str, runs: list[list[dict]]) -> dict[str, Any]:
    """Per rank, the median over repeats of every figure (the counts do not vary)."""
    ranks = []
    for rank in range(len(runs[0])):
        recs = [run[rank] for run in runs]
        first = recs[0]

        def med(get):
            return common.median([get(r) for r in recs])  # noqa: B023 - used right away

        ranks.append(
            {
                "rank": rank,
                "peak_rss_bytes": med(lambda r: r["peak_rss_bytes"]),
                "peak_rss_after_load_bytes": med(lambda r: r["peak_rss_after_load_bytes"]),
                "rss_after_steps_bytes": med(lambda r: r["rss"]["after_steps"]["rss"]),
                "uss_after_steps_bytes": med(lambda r: r["rss"]["after_steps"]["uss"]),
                "rss_start_bytes": med(lambda r: r["rss"]["start"]["rss"]),
                "params": first["params"],
                "optimizer": first["optimizer"],
                # step 1 builds buffers / gathers for the first time: the median of the rest
                "median_step_seconds": med(
                    lambda r: common.median(r["step_seconds"][1:] or r["step_seconds"])
                ),
                "losses": first["losses"],
                "all_runs": recs,
            }
        )
    return {
        "config": name,
        "template": CONFIGS[name][0],
        "zero_stage": runs[0][0]["zero_stage"],
        "offload": runs[0][0]["offload"],
        "ranks": ranks,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints a Markdown table and the machine; --out writes everything as JSON.",
    )
    common.add_common_args(p, repeats=1, threads=False)  # ranks: 1 thread
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma list of {list(CONFIGS)} (default: all, run in this order)",
    )
    p.add_argument("--ranks", type=int, default=2, help="processes per run (default 2)")
    p.add_argument("--steps", type=int, default=3, help="training steps per run (default 3)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank (default 4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--labels", type=int, default=3, help="classification labels (default 3)")
    p.add_argument(
        "--persistence-threshold",
        type=int,
        default=100000,
        help="ZeRO-3 stage3_param_persistence_threshold (default 100000, the repo's default; "
        "0 partitions every parameter)",
    )
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    args = p.parse_args(argv)
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.config_list if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    common.setup_env()
    args = parse_args(argv)
    path = common.resolve_model(args.model)
    info = common.machine_info()
    info["worker_env"] = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    print(common.machine_line(info))
    results: dict[str, Any] = {
        "bench": "zero_memory",
        "model": args.model,
        "model_path": str(path),
        "machine": info,
        "ranks": args.ranks,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "persistence_threshold": args.persistence_threshold,
        "configs": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="zero_memory-"))
    try:
        for name in args.config_list:
            runs = []
            for rep in range(args.repeats):
                t0 = time.monotonic()
                runs.append(launch(name, path, args, tmp / f"{name}-{rep}"))
                print(f"  {name} run {rep + 1}/{args.repeats}: {time.monotonic() - t0:.1f} s",
                      flush=True)  # fmt: skip
            results["configs"][name] = summarize(name, runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "alsace_ds.tools.shm_cleanup"], cwd=common.REPO,
                       check=False)  # fmt: skip

    rows = []
    for name, res in results["configs"].items():
        for r in res["ranks"]:
            par, opt = r["params"], r["optimizer"]
            rows.append([
                name, r["rank"], r["peak_rss_bytes"] / MiB, r["rss_after_steps_bytes"] / MiB,
                r["uss_after_steps_bytes"] / MiB, par["held_bytes"] / MiB,
                f"{100 * par['partition_share']:.1f}%", opt["state_bytes"] / MiB,
                opt["master_bytes"] / MiB, r["median_step_seconds"],
            ])  # fmt: skip
    first = next(iter(results["configs"].values()), None)
    if first:
        full = first["ranks"][0]["params"]["full_numel"]
        print(
            f"\nmodel {args.model} ({full / 1e6:.1f}M params, fp32), {args.ranks} ranks, "
            f"{args.steps} steps of {args.micro_batch} x {args.seq_len} tokens per rank, torch "
            f"AdamW; memory in MiB; median of {args.repeats} run(s)"
        )
    print(
        common.markdown_table(
            [
                "config",
                "rank",
                "peak RSS",
                "RSS after steps",
                "USS after steps",
                "params held",
                "param share",
                "optimizer state",
                "fp32 master copy",
                "step s",
            ],
            rows,
        )  # fmt: skip
    )
    common.write_json(args.out, results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
