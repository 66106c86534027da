"""How a process finds its GPU, refuses the CPU when it was given GPUs, and reports a bad
launch on one rank's output only."""

from __future__ import annotations

import subprocess
import sys

import pytest

from _launch import ROOT, TRAIN, child_env
from alsace_ds.parallel import LaunchError, check_not_cpu_with_gpus, device_index, gpus_given


def test_device_index_uses_the_visible_devices():
    assert device_index(0, 8) == 0 and device_index(5, 8) == 5  # torchrun: every GPU visible
    assert device_index(3, 1) == 0  # srun --gpus-per-task=1: LOCAL_RANK 3, one visible GPU
    with pytest.raises(LaunchError, match="LOCAL_RANK 5 but this process sees only 4 CUDA"):
        device_index(5, 4)
    with pytest.raises(LaunchError, match="no CUDA device is visible"):
        device_index(0, 0)


def test_gpus_given(tmp_path):
    no_dev = tmp_path / "empty"
    no_dev.mkdir()
    assert gpus_given({}, no_dev) is None
    # the deepspeed launcher sets CUDA_VISIBLE_DEVICES=0,1 even for CPU ranks: not a GPU
    assert gpus_given({"CUDA_VISIBLE_DEVICES": "0,1"}, no_dev) is None
    assert gpus_given({"SLURM_GPUS_ON_NODE": "0", "SLURM_JOB_GPUS": ""}, no_dev) is None
    assert gpus_given({"SLURM_JOB_GPUS": "0,1"}, no_dev) == "SLURM_JOB_GPUS=0,1"
    assert gpus_given({"SLURM_GPUS_ON_NODE": "8"}, no_dev) == "SLURM_GPUS_ON_NODE=8"
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        (dev / name).touch()
    assert gpus_given({}, dev) == f"2 NVIDIA device(s) in {dev}"
    assert gpus_given({"CUDA_VISIBLE_DEVICES": "-1"}, dev) is None  # hidden on purpose


def test_cpu_accelerator_with_gpus_is_refused():
    env = {"SLURM_JOB_GPUS": "0", "DS_ACCELERATOR": "cpu"}
    with pytest.raises(LaunchError) as err:
        check_not_cpu_with_gpus("cpu", env)
    assert str(err.value).startswith(
        "this process was given GPUs (SLURM_JOB_GPUS=0) but DeepSpeed's accelerator is the "
        "CPU (DS_ACCELERATOR=cpu is set); refusing to train on the CPU."
    )
    with pytest.raises(LaunchError, match="torch sees no CUDA device"):
        check_not_cpu_with_gpus("cpu", {"SLURM_JOB_GPUS": "0"})
    check_not_cpu_with_gpus("cpu", {**env, "ALSACE_ALLOW_CPU": "1"})  # meant: no error
    check_not_cpu_with_gpus("cuda", env)
    check_not_cpu_with_gpus("cpu", {"DS_ACCELERATOR": "cpu"})  # no GPUs given: the CPU it is


def _train(env_extra: dict[str, str], args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = child_env(tmp_path / "cache")
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, str(TRAIN), *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.launch
def test_entry_point_refuses_the_cpu_in_a_gpu_job(tmp_path):
    """Through the real entry point: exit 2 and the reason, before any training."""
    res = _train({"SLURM_JOB_GPUS": "0,1"}, [f"run.output_dir={tmp_path / 'run'}"], tmp_path)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "alsace_ds: error: this process was given GPUs (SLURM_JOB_GPUS=0,1)" in res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.launch
def test_a_bad_config_is_reported_by_rank_0_only(tmp_path):
    for rank, expect in (("0", True), ("1", False)):
        env = {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank}
        res = _train(env, ["distill.lr=-1"], tmp_path)
        assert res.returncode == 2
        said = "distill.lr: must be > 0, got -1" in res.stderr
        assert said is expect, (rank, res.stderr)
