"""MPI launch: `mpirun -np 2 python alsace_ds/train.py`, ranks discovered through mpi4py by
DeepSpeed's auto_mpi_discovery (the alternative to the deepspeed/torchrun launchers)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from _dist_helpers import free_port
from _launch import TRAIN, child_env, run_cmd


def test_mpirun_two_ranks(tmp_path, cache):
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: install Debian's openmpi-bin (see .ci/run)"
    out = tmp_path / "run"
    env = child_env(cache)
    env["MASTER_PORT"] = str(free_port())  # not DeepSpeed's fixed 29500: another job may hold it
    # What slurm/common.sh exports (the allocation's first host). DeepSpeed's MPI discovery
    # would replace it by the first address of `hostname -I` (unreachable on multi-homed
    # nodes); 127.0.0.2 is a loopback address that `hostname -I` never prints.
    env["MASTER_ADDR"] = "127.0.0.2"
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2"]
    for name in ("DS_ACCELERATOR", "OMP_NUM_THREADS", "ALSACE_CACHE", "PYTHONUNBUFFERED",
                 "MASTER_PORT", "MASTER_ADDR"):  # fmt: skip
        cmd += ["-x", name]
    cmd += [sys.executable, str(TRAIN), f"run.output_dir={out}", "stage0.max_steps=3"]
    cmd += ["distill.max_steps=2", "log.progress=false", "eval.every_epoch=false"]
    res = run_cmd(cmd, env, timeout=600)
    assert res.returncode == 0, res.stdout[-5000:]
    assert "(ZeRO-2, 2 rank(s))" in res.stdout
    rendezvous = f"rendezvous 127.0.0.2:{env['MASTER_PORT']}"
    assert f"2 rank(s) on cpu (rank 0: cpu), {rendezvous}" in res.stdout
    report = json.loads((out / "report.json").read_text())
    sel = json.loads((out / "selection.json").read_text())
    assert sorted(sel["teachers"] + sel["students"]) == sorted(report["languages"])
    assert sel["num_examples"] == 500
    assert all(0 <= a <= 100 for a in report["after"]["accuracy"].values())
    assert (out / "final" / "model" / "config.json").is_file()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
