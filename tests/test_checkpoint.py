"""Checkpoints and run directories a resumed job can trust: atomic commits with a manifest,
verified and unpickle-free loads, a broken ``latest`` named, reuse checked against the config
that made each output, one job per run directory, stop requests from a dead launcher."""

from __future__ import annotations

import json
import os
import pickle
import stat
import sys
import time
from pathlib import Path

import pytest
import yaml

from _dist_helpers import REPO, TINY_ENGINE, child_env, run_code
from alsace_ds.config import ConfigError, load_config
from alsace_ds.engine import checkpoint, rundir
from alsace_ds.io import atomic_write_json, atomic_write_text
from alsace_ds.recipes.loop import checkpoint_minutes
from alsace_ds.tools import procs

ENGINE_CODE = (
    TINY_ENGINE
    + r"""
import json, pathlib, shutil, sys, torch
from alsace_ds.engine import checkpoint
from alsace_ds.io import sha256_file
from alsace_ds import parallel

out = pathlib.Path(sys.argv[1])
ctx = parallel.init_distributed(60)
results = {}

class Evil:
    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(sys.argv[2]),))

def attempt(engine, folder):
    try:
        checkpoint.verify(folder, "step1", ctx)  # what start-up does before any load
        state = checkpoint.load(engine, folder, "step1", ctx)
        return {"ok": state}
    except checkpoint.CheckpointError as exc:
        return {"error": str(exc)}

for stage in (2, 3):
    engine, tok, _ = tiny_engine(out / f"model{stage}", stage)
    enc = tok(["a b", "c"], return_tensors="pt", padding=True)
    engine.backward(engine(**enc).float().sum()); engine.step()
    folder = out / f"zero{stage}"
    state = {"stage": "distill", "micro": 1, "complete": False, "callback": {"best": 0.5},
             "launch": {"world_size": 1, "view_size": 1, "zero_stage": stage}}
    checkpoint.commit(engine, folder, "step1", ctx, state, keep=2)
    r = results[stage] = {}
    r["latest"] = (folder / "latest").read_text()
    r["manifest"] = sorted(json.loads((folder / "step1" / "manifest.json").read_text())["files"])
    after_commit = torch.rand(3).tolist()
    r["clean"] = attempt(engine, folder)
    r["rng_restored"] = torch.rand(3).tolist() == after_commit
    shutil.copytree(folder / "step1", out / "backup")
    optim = next((folder / "step1").glob("*optim_states.pt"))
    model = next((folder / "step1").glob("*model_states.pt"))
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])
    r["truncated"] = attempt(engine, folder)
    optim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    r["altered"] = attempt(engine, folder)
    optim.write_bytes(data)
    (folder / "step1" / "extra.pt").write_bytes(b"x")
    r["extra"] = attempt(engine, folder)
    (folder / "step1" / "extra.pt").unlink()
    torch.save({"module": Evil()}, model)  # a planted pickle, its manifest entry mended too
    man = json.loads((folder / "step1" / "manifest.json").read_text())
    man["files"][model.name] = {"bytes": model.stat().st_size,
                                "sha256": sha256_file(model)}
    (folder / "step1" / "manifest.json").write_text(json.dumps(man))
    r["planted"] = attempt(engine, folder)
    shutil.rmtree(out / "backup")
print("RESULTS " + json.dumps(results))
parallel.shutdown()
"""
)


@pytest.mark.launch
def test_commit_verify_and_load_refuse_damage_and_pickles(tmp_path):
    """ZeRO-2 and ZeRO-3, real DeepSpeed files: a commit lists every file with its hash; a
    clean load returns the training state and restores the RNG; a truncated, an altered or
    an extra file is refused by name; a planted pickle (manifest mended too) is refused by
    the weights-only loader and never runs."""
    marker = tmp_path / "pwned"
    res = run_code(ENGINE_CODE, str(tmp_path), str(marker))
    assert res.returncode == 0, res.output[-6000:]
    results = json.loads(res.output.split("RESULTS ", 1)[1].splitlines()[0])
    for stage in ("2", "3"):
        r = results[stage]
        assert r["latest"] == "step1"
        assert "rng_rank0.pt" in r["manifest"] and any("optim_states" in n for n in r["manifest"])
        assert r["clean"]["ok"]["callback"] == {"best": 0.5}, r["clean"]
        assert r["clean"]["ok"]["launch"]["zero_stage"] == int(stage)
        assert r["rng_restored"]
        assert "optim_states.pt: " in r["truncated"]["error"], r["truncated"]
        assert "bytes, the commit wrote" in r["truncated"]["error"]
        assert "contents differ from the commit (SHA-256)" in r["altered"]["error"]
        assert "extra.pt: not part of the commit" in r["extra"]["error"]
        assert "model_states.pt: refused to load" in r["planted"]["error"], r["planted"]
        assert "(Unsupported global: GLOBAL getattr)" in r["planted"]["error"]  # what it met
    assert not marker.exists()  # the planted pickle never ran


def test_safe_load_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "rng_rank0.pt"
    path.write_bytes(pickle.dumps({"cpu": Evil()}))
    with pytest.raises(checkpoint.CheckpointError, match="rng_rank0.pt: refused to load"):
        checkpoint.safe_load(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the file really runs code when unpickled
    assert marker.exists()


def _tags(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _fake_commit(folder: Path, tag: str) -> None:
    atomic_write_json(folder / tag / checkpoint.MANIFEST, {"tag": tag, "record": {}, "files": {}})


def test_a_broken_latest_is_named_and_nothing_is_deleted(tmp_path):
    folder = tmp_path / "checkpoints" / "distill"
    for tag in ("step10", "step20"):
        _fake_commit(folder, tag)
    assert checkpoint.read_latest(folder) is None  # never committed
    atomic_write_text(folder / "latest", "step20")
    assert checkpoint.read_latest(folder) == "step20"
    atomic_write_text(folder / "latest", "step30")
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read_latest(folder)
    assert f"{folder / 'latest'} names 'step30', which does not exist" in str(err.value)
    assert "tags here: step10, step20" in str(err.value)
    (folder / "latest").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(checkpoint.CheckpointError, match="latest: not a checkpoint tag"):
        checkpoint.read_latest(folder)
    (folder / "step5").mkdir()  # a folder an interrupted commit left: no manifest
    atomic_write_text(folder / "latest", "step5")
    with pytest.raises(checkpoint.CheckpointError, match="'step5', which has no manifest.json"):
        checkpoint.read_latest(folder)
    assert _tags(folder) == ["step10", "step20", "step5"]


def test_pruning_never_deletes_a_tag_newer_than_the_commit(tmp_path):
    for tag in ("step4", "step8", "step12", "step16"):
        _fake_commit(tmp_path, tag)
    assert checkpoint.prune(tmp_path, "step8", keep=1) == ["step4"]
    assert _tags(tmp_path) == ["step12", "step16", "step8"]
    assert checkpoint.prune(tmp_path, "step16", keep=2) == ["step8"]
    assert _tags(tmp_path) == ["step12", "step16"]


def test_outputs_are_readable_by_the_group(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ----------------------------------------------------------------------------- reuse checks


def _cfg(out: Path, *overrides: str):
    return load_config(REPO / "configs" / "default.yaml", [f"run.output_dir={out}", *overrides])


FACTS = {"stage0": rundir.launch_facts(2, 1, 2), "distill": rundir.launch_facts(2, 1, 2)}


def _made_run(out: Path, *overrides: str) -> None:
    """A run directory as a 2-rank ZeRO-2 job leaves it: config, stage-0 export, a commit."""
    cfg = _cfg(out, *overrides)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    model = out / "stage0" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    rundir.write_provenance(model, cfg)
    folder = out / "checkpoints" / "distill"
    record = {"stage": "distill", "micro": 3, "complete": False, "launch": FACTS["distill"]}
    atomic_write_json(folder / "step3" / checkpoint.MANIFEST, {"record": record, "files": {}})
    atomic_write_text(folder / "latest", "step3")


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_reuse_of_a_run_directory_is_checked_against_its_config(tmp_path):
    out = tmp_path / "run"
    assert rundir.reuse_problems(_cfg(out), FACTS) == []  # nothing there yet
    _made_run(out)
    assert rundir.reuse_problems(_cfg(out), FACTS) == []
    assert rundir.reuse_problems(_cfg(out, "eval.batch_size=7"), FACTS) == []  # free key
    seed = rundir.reuse_problems(_cfg(out, "run.seed=7"), FACTS)
    assert seed == [
        f"cannot continue {out} with a different setup (run.seed: 42 in the run directory, "
        "7 now); use another run.output_dir",
        f"{out / 'stage0' / 'model'} was made with run.seed = 42, this run has 7: stage 0 would "
        "not be redone; use another run.output_dir (or remove that folder to retrain stage 0)",
    ]
    never = rundir.reuse_problems(_cfg(out, "run.resume=never"), FACTS)
    assert (
        len(never) == 1 and "already holds outputs (config.yaml, checkpoints, stage0)" in never[0]
    )
    four = {**FACTS, "distill": rundir.launch_facts(4, 1, 2)}
    (world,) = rundir.reuse_problems(_cfg(out), four)
    assert "step3 was written by 2 rank(s) and this job has 4" in world
    assert "resume it with 2 rank(s)" in world
    zero3 = {**FACTS, "distill": rundir.launch_facts(2, 1, 3)}
    (z,) = rundir.reuse_problems(_cfg(out), zero3)
    assert "written with ZeRO stage 2, this job uses 3" in z


def test_a_stage0_model_is_not_served_to_another_stage0_config(tmp_path):
    """The checkpoints removed, stage0.lr changed: stage 0 would be skipped and its old
    model served; refused instead, by name, and config.yaml is left as it was."""
    out = tmp_path / "run"
    _made_run(out)
    import shutil

    shutil.rmtree(out / "checkpoints")
    saved = _snapshot(out)
    problems = rundir.reuse_problems(_cfg(out, "stage0.lr=5e-4"), FACTS)
    assert _snapshot(out) == saved  # the check reads only: config.yaml and all else as they were
    assert (
        f"{out / 'stage0' / 'model'} was made with stage0.lr = 0.001, this run has 0.0005"
        in (problems[-1])
    )
    assert "stage0.lr: 0.001 in the run directory, 0.0005 now" in problems[0]
    (out / "stage0" / "model" / rundir.PROVENANCE).unlink()
    (out / "config.yaml").unlink()
    problems = rundir.reuse_problems(_cfg(out), FACTS)
    assert problems == [
        f"run.output_dir: {out} holds outputs (stage0) but no config.yaml, so the config that "
        "made them is unknown; use another output_dir"
    ]


def test_a_broken_latest_refuses_the_run_at_start(tmp_path):
    out = tmp_path / "run"
    _made_run(out)
    (out / "checkpoints" / "distill" / "latest").write_bytes(b"\x80\x81")
    (problem,) = rundir.reuse_problems(_cfg(out), FACTS)
    assert problem.startswith(f"{out / 'checkpoints' / 'distill' / 'latest'}: not a checkpoint tag")


def test_one_job_per_run_directory(tmp_path):
    first = rundir.RunLock(tmp_path)
    first.acquire()
    said = []
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        rundir.RunLock(tmp_path).acquire(wait_s=1.0, say=said.append)
    assert time.monotonic() - t0 >= 1.0
    assert f"pid {os.getpid()}" in str(err.value) and "is in use by another job" in str(err.value)
    assert said and said[0].startswith("waiting (at most 1 s) for the job that still holds")
    first.release()
    second = rundir.RunLock(tmp_path)
    second.acquire(wait_s=0)
    second.release()


def test_periodic_checkpoints_by_default_inside_slurm():
    assert checkpoint_minutes(None, {"SLURM_JOB_ID": "7"}) == 30.0
    assert checkpoint_minutes(None, {}) == 0.0
    assert checkpoint_minutes(5.0, {}) == 5.0
    assert checkpoint_minutes(0.0, {"SLURM_JOB_ID": "7"}) == 0.0


# ----------------------------------------------------------------------------- launcher watch

WATCHED = r"""
import sys, time
from alsace_ds.engine import signals
chain = signals.watch_launcher(lambda: print("on_exit", flush=True), poll_s=0.05)
print("chain", [p.name for p in chain], flush=True)
for _ in range(400):
    if signals.requested():
        print("requested:", signals.reason(), flush=True)
        break
    time.sleep(0.05)
time.sleep(5)
"""


@pytest.mark.launch
def test_a_dead_launcher_stops_its_ranks(tmp_path):
    """A rank whose launcher (here a process named torchrun) is killed requests a stop at
    once, and ends itself (exit 75, after on_exit) if it is still running after the grace."""
    script = tmp_path / "rank.py"
    script.write_text(WATCHED)
    env = child_env({"ALSACE_LAUNCHER_GRACE_S": "1", "PYTHONPATH": str(REPO)})
    cmd = ["bash", "-c", f'exec -a torchrun bash -c "{sys.executable} {script}; sleep 60"']
    with procs.start(cmd, env, stderr=None) as job:  # killed at the end, the rank too
        out = job.proc.stdout
        assert out.readline().strip() == "chain ['torchrun']"
        job.proc.kill()  # SIGKILL to the launcher alone: nothing can be forwarded
        job.wait()
        t0 = time.monotonic()
        line = out.readline().strip()
        assert line.startswith("requested: the launcher (torchrun, pid "), line
        assert line.endswith(") exited")
        assert out.readline().strip() == "on_exit"
        assert time.monotonic() - t0 < 5  # the grace (1 s), not the rank's own 5 s sleep
