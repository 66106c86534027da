"""MPI launch: `mpirun -np 2 python alsace_ds/train.py`, ranks discovered through mpi4py by
DeepSpeed's auto_mpi_discovery (the alternative to the deepspeed/torchrun launchers)."""

from __future__ import annotations

import shutil
import sys

import pytest

from _dist_helpers import free_port
from _launch import TRAIN, check_report, check_selection, child_env, run_cmd, stage0_used

pytestmark = pytest.mark.launch


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
    # one epoch of stage 0 (63 steps): languages that differ, predictions that are not all alike
    cmd += [sys.executable, str(TRAIN), f"run.output_dir={out}", "stage0.epochs=1"]
    cmd += ["distill.max_steps=2", "log.progress=false", "eval.every_epoch=false"]
    res = run_cmd(cmd, env, timeout=600)
    assert res.returncode == 0, res.stdout[-5000:]
    assert "(ZeRO-2, 2 rank(s))" in res.stdout
    rendezvous = f"rendezvous 127.0.0.2:{env['MASTER_PORT']}"
    assert f"2 rank(s) on cpu (rank 0: cpu), {rendezvous}" in res.stdout
    # what the 2 MPI ranks selected and reported == one process on the same models: the one
    # distillation started from (no dev checks here, so no best: stage0/model) and the export
    start = stage0_used(out, res.stdout)
    assert start == out / "stage0" / "model"
    sel = check_selection(out, start)
    assert sel["num_examples"] == 500
    check_report(out, start, out / "final" / "model")


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
