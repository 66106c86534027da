"""Real Slurm submissions of slurm/alsace_mt5.sh on a one-node local cluster (no mocks).

The module fixture starts the cluster with ``slurm/local_cluster.sh start`` (root only; apt
installs Slurm and munge when missing) and stops it at the end only if it started it. The
GPU script is submitted with command-line options that override its ``#SBATCH`` GPU lines
(``--gpus-per-node=0``; ``--gres=none`` is refused by Slurm 22.05) plus ``ALSACE_CPU=1
NPROC_PER_NODE=2``, so torchrun starts 2 CPU ranks (gloo) inside one srun task.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from _launch import check_report, check_selection, frozen, rank_pids, stage0_used

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "slurm" / "local_cluster.sh"
SCRIPT = ROOT / "slurm" / "alsace_mt5.sh"
# Overrides of the script's #SBATCH lines that this 2-core GPU-less machine can satisfy.
CPU_SBATCH = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2", "--time=00:10:00"]
TINY = [
    "model.name_or_path=embedded",
    "model.dtype=fp32",
    "deepspeed.config=ds_configs/zero2.json",
    "stage0.max_steps=6",
    "distill.max_steps=2",
    "log.progress=false",
]


def _sh(*cmd: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        reason = "local Slurm cluster needs root (apt install, /etc/slurm)"
        print(f"SKIP test_slurm: {reason}")
        pytest.skip(reason)
    was_up = _sh(str(CLUSTER), "status").returncode == 0
    res = _sh(str(CLUSTER), "start", timeout=600)
    if res.returncode == 3:  # not root / apt or Slurm cannot be installed
        reason = f"cannot install/run Slurm: {res.stderr.strip()[-500:]}"
        print(f"SKIP test_slurm: {reason}")
        pytest.skip(reason)
    assert res.returncode == 0, f"local_cluster.sh start failed:\n{res.stdout}\n{res.stderr}"
    yield
    if not was_up:
        _sh(str(CLUSTER), "stop", timeout=60)


def _submit(
    tmp: Path, env_extra: dict[str, str], args: list[str], sbatch: list[str] | None = None
) -> tuple[str, Path]:
    env = dict(os.environ)
    env.update(env_extra)
    out = tmp / "slurm-%j.out"
    opts = [*CPU_SBATCH, *(sbatch or [])]  # later options win
    cmd = ["sbatch", "--parsable", f"--output={out}", *opts, str(SCRIPT), *args]
    print("submit:", " ".join(cmd))
    res = _sh(*cmd, cwd=ROOT, env=env)
    assert res.returncode == 0, f"sbatch refused: {res.stderr}"
    job = res.stdout.strip().split(";")[0]
    return job, tmp / f"slurm-{job}.out"


def _job_state(job: str) -> dict[str, str]:
    res = _sh("scontrol", "show", "job", "-o", job)
    return dict(re.findall(r"(\w+)=(\S*)", res.stdout)) if res.returncode == 0 else {}


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY"}


def _wait(job: str, out: Path, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while time.monotonic() < deadline:
        info = _job_state(job)
        if info.get("JobState") in FINAL:
            return info
        _start_requeued_now(info, LIMIT_MINUTES)
        time.sleep(1)
    _sh("scancel", job)
    text = out.read_text() if out.exists() else "(no output file)"
    pytest.fail(
        f"job {job} not done after {timeout}s (state {info.get('JobState')}):\n{text[-5000:]}"
    )


def _start_requeued_now(info: dict[str, str], minutes: int | None = None) -> None:
    """Slurm holds a requeued job for ~2 minutes (Reason=BeginTime); a test need not wait so
    long, but the next attempt must not start in the second its predecessor's credential was
    revoked (slurmd then kills it: "Job credential revoked", seen here): a few seconds on.
    ``minutes``: the time limit the next attempt gets."""
    if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        limit = [f"TimeLimit={minutes}"] if minutes else []
        _sh("scontrol", "update", f"JobId={info['JobId']}", "StartTime=now+3", *limit)


def _cleanup(job: str, port: str | None) -> None:
    _sh("scancel", job)  # no-op for a finished job
    if port:
        for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            f.unlink(missing_ok=True)


def _port(text: str) -> str | None:
    m = re.search(r"master=\S+:(\d+)", text)
    return m.group(1) if m else None


def _dry_run(tmp: Path, env_extra: dict[str, str], args: list[str]) -> tuple[str, dict, str]:
    env = {"ALSACE_DRY_RUN": "1", "ALSACE_CPU": "1", "NPROC_PER_NODE": "2", **env_extra}
    tmp.mkdir(parents=True, exist_ok=True)
    job, out = _submit(tmp, env, args)
    info = _wait(job, out, 60)
    _cleanup(job, None)
    return job, info, out.read_text()


def test_dry_run_wiring(cluster, tmp_path):
    """Default run dir is named with the job id; master addr/port, torchrun args, overrides.
    Two jobs on one node get different rendezvous ports by default; MASTER_PORT wins."""
    args = ["--config", "configs/default.yaml", "a.b=1", "x.y=two words"]
    runs = [_dry_run(tmp_path / "a", {}, args), _dry_run(tmp_path / "b", {}, args),
            _dry_run(tmp_path / "c", {"MASTER_PORT": "23456"}, args)]  # fmt: skip
    ports = []
    for job, info, text in runs:
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
        host = _sh("scontrol", "show", "hostnames", info["NodeList"]).stdout.split()[0]
        port = _port(text)
        assert port is not None and f"master={host}:{port} " in text, text
        ports.append(int(port))
        cmd = next(x for x in text.splitlines() if x.startswith("alsace-slurm: command:"))
        assert "nproc_per_node=2" in text and "launcher=torchrun" in text
        assert "srun --nodes=1 --ntasks-per-node=1" in cmd
        for arg in ("--nnodes 1", "--nproc_per_node 2", f"--master_addr {host}",
                    f"--master_port {port}", "torch.distributed.run"):  # fmt: skip
            assert arg in cmd, (arg, cmd)
        # --config first, then the preset, then the user's overrides, then the default run dir
        tail = shlex.split(cmd.split("alsace_ds/train.py", 1)[1])
        assert tail[:2] == ["--config", "configs/default.yaml"]
        assert tail.index("model.name_or_path=google/mt5-large") < tail.index("a.b=1")
        assert "x.y=two words" in tail
        assert tail[-1] == f"run.output_dir=runs/alsace-mt5-{job}"
        assert "dry run, not launching" in text
    # in the range the script's header promises (20000-39999), one per job, MASTER_PORT wins
    assert all(20000 <= p < 40000 for p in ports[:2]) and ports[0] != ports[1], ports
    assert ports[2] == 23456


def test_real_tiny_mt5_two_ranks(cluster, tmp_path):
    run_dir = tmp_path / "run"
    env = {
        "ALSACE_CPU": "1",
        "NPROC_PER_NODE": "2",
        "ALSACE_CACHE": str(tmp_path / "cache"),
    }
    t0 = time.monotonic()
    # one epoch of stage 0 (63 steps; TINY's 6 leave every view predicting alike, so that
    # selection and accuracies would say little)
    job, out = _submit(tmp_path, env, [*TINY, "stage0.max_steps=63", f"run.output_dir={run_dir}"])
    try:
        info = _wait(job, out, 300)
        text = out.read_text() if out.exists() else ""
    finally:
        _cleanup(job, _port(out.read_text()) if out.exists() else None)
    print(f"job {job}: {info.get('JobState')} in {time.monotonic() - t0:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert "(ZeRO-2, 2 rank(s))" in text, text[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    langs = report["languages"]
    assert len(langs) == 7 and report["english"] in langs, report["languages"]
    # what the 2 ranks under srun + torchrun selected and reported == one process on the same
    # models: the stage-0 model distillation started from (the best by dev accuracy) and the
    # exported final model (mT5, fp32 compute here)
    start = stage0_used(run_dir, text)
    assert start == run_dir / "stage0" / "best"
    check_selection(run_dir, start)
    check_report(run_dir, start, run_dir / "final" / "model")


def _loss_curve(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("distill/train/loss")}


# Selection one view per forward (50 examples x 7 languages: 175 forwards per rank, a poll
# every 8), then 40 distill steps. Where each attempt is cut does not depend on this
# machine's speed: the test freezes the ranks (SIGSTOP) while the signal is on its way.
DISTILL_STEPS = 40
LONG = [*TINY, f"distill.max_steps={DISTILL_STEPS}", "distill.epochs=100", "run.log_every=1",
        "eval.every_epoch=false", "selection.batch_size=1", "task.max_unlabeled=50"]  # fmt: skip
CPU_ENV = {"ALSACE_CPU": "1", "NPROC_PER_NODE": "2"}
LIMIT_MINUTES = 15  # a limit no attempt reaches on its own


@pytest.fixture(scope="module")
def long_reference(cluster, tmp_path_factory) -> Path:
    """The uninterrupted job that every interrupted one must end equal to."""
    tmp = tmp_path_factory.mktemp("slurm_reference")
    env = {**CPU_ENV, "ALSACE_CACHE": str(tmp / "cache")}
    job, out = _submit(tmp, env, [*LONG, f"run.output_dir={tmp / 'run'}"])
    try:
        info = _wait(job, out, 600)
    finally:
        _cleanup(job, _port(out.read_text()) if out.exists() else None)
    assert info["JobState"] == "COMPLETED", out.read_text()[-3000:]
    return tmp / "run"


def _wait_for_line(job: str, out: Path, line: str, after: int = 0, timeout: float = 300) -> int:
    """Wait until ``line`` appears in the job's output past offset ``after``; its offset.
    A requeued attempt is started at once, with the whole time limit again."""
    deadline = time.monotonic() + timeout
    while (at := (out.read_text() if out.exists() else "").find(line, after)) < 0:
        info = _job_state(job)
        text = out.read_text()[-3000:] if out.exists() else ""
        assert time.monotonic() < deadline, f"never saw {line!r}:\n{text}"
        assert info.get("JobState") not in FINAL, f"job {job} {info.get('JobState')}:\n{text}"
        _start_requeued_now(info, LIMIT_MINUTES)
        time.sleep(0.2)
    return at


def _frozen(run_dir: Path):
    """The job's 2 ranks frozen for the block (``_launch.frozen``)."""
    pids = list(rank_pids(run_dir).values())
    assert len(pids) == 2, pids
    return frozen(pids)


def _matches_reference(run_dir: Path, ref: Path) -> None:
    ref_losses, got = _loss_curve(ref), _loss_curve(run_dir)
    assert sorted(got) == list(range(1, DISTILL_STEPS + 1))  # none lost or repeated
    assert got == ref_losses  # bit-identical losses, the final one included
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (ref, run_dir))
    for key in ("teachers", "students", "before", "after", "param_change"):
        assert ra[key] == rb[key], key
    md = [(d / "report.md").read_text().replace(str(d.parent), "<tmp>") for d in (ref, run_dir)]
    assert md[0] == md[1]  # the same report, but for where each job's data cache was


def test_usr1_in_selection_then_the_time_limit_requeue_and_resume(
    cluster, tmp_path, long_reference
):
    """One job, three attempts, each cut the way Slurm cuts jobs:
    1. USR1 to the batch shell (what `--signal=B:USR1` does) during selection: every rank
       stops at its next poll inside the inference loop; the job requeues itself;
    2. once distill has started, the attempt's time limit is brought to now (`scontrol update
       EndTime=now`; slurmctld acts at its next time-limit check, within ~30 s) with no USR1
       beforehand: Slurm sends TERM to the batch shell and every step process (SIGKILL 30 s
       later), torchrun forwards it, the ranks commit and exit, the shell sees
       Reason=TimeLimit and the stop file, requeues;
    3. the job resumes from that commit (its limit raised again) and finishes.
    The ranks are frozen from the moment each attempt reaches its stage until the signal has
    arrived, so the cuts land in selection and in distill on any machine. Finished work is
    kept (the evaluation before, then the selection), and the job ends equal to one that was
    never interrupted."""
    env = {**CPU_ENV, "ALSACE_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / "run"
    # --signal=B:URG@1 replaces the script's USR1@300 (URG is ignored by bash): TERM only.
    job, out = _submit(tmp_path, env, [*LONG, f"run.output_dir={run_dir}"],
                       [f"--time={LIMIT_MINUTES}", "--signal=B:URG@1"])  # fmt: skip
    try:
        at = _wait_for_line(job, out, "selection: label distributions of 350 unlabeled views")
        with _frozen(run_dir):
            assert _sh("scancel", "--signal=USR1", "--batch", job).returncode == 0
            at = _wait_for_line(job, out, "alsace-slurm: USR1:", at)
            time.sleep(2)  # the batch shell's scancel reaches the step's processes
        at = _wait_for_line(job, out, "requeueing job", at)
        at = _wait_for_line(job, out, "distill: ", at)  # attempt 2 is in distill
        with _frozen(run_dir):
            assert _sh("scontrol", "update", f"JobId={job}", "EndTime=now").returncode == 0
            _wait_for_line(job, out, "alsace-slurm: TERM:", at, timeout=120)
        info = _wait(job, out, 600)
        text = out.read_text()
    finally:
        _cleanup(job, _port(out.read_text()) if out.exists() else None)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-5000:]
    assert info.get("Restarts") == "2", info
    first = text.index("requeueing job")
    second = text.index("requeueing job", first + 1)
    one, two, three = text[:first], text[first:second], text[second:]
    assert "alsace_ds: stopped during selection (SIGUSR1); finished work kept" in one
    assert "stopped on request: stopped during selection (SIGUSR1)\n" in one
    assert f"requeueing job {job} (USR1, " in text[first:]
    assert "before: reusing the result of an earlier attempt" in two
    assert two.count("selection: label distributions") == 1  # selection redone, once
    assert "DUE TO TIME LIMIT" in two and "alsace-slurm: TERM:" in two
    assert "alsace_ds: distill stopped at optimizer step" in two and "(SIGTERM)" in two
    assert f"requeueing job {job} (TERM, Reason=TimeLimit)" in text[second:]
    assert "selection: reusing the result" in three and "distill: resumed from checkpoint" in three
    _matches_reference(run_dir, long_reference)


def _curves(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.endswith("/train/loss")]
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags}


def test_two_node_launchers_equal_one_launcher(cluster, tmp_path):
    """Two torchrun launchers of one rank each (two "nodes": --nnodes 2, node ranks 0 and 1,
    one rendezvous), started by slurm/common.sh as srun tasks, with one view group spanning
    both (view parallel 2: each example's views split across the nodes, gathered over the
    network): the same losses, selection and report as the same job on one launcher of 2
    ranks."""
    args = [*TINY, "stage0.max_steps=6", "distill.max_steps=4", "distill.micro_batch=8",
            "distill.view_parallel_size=2", "run.log_every=1"]  # fmt: skip
    env = {"ALSACE_CPU": "1", "ALSACE_CACHE": str(tmp_path / "cache")}
    two_dir, one_dir = tmp_path / "two", tmp_path / "one"
    two = _submit(tmp_path, {**env, "NPROC_PER_NODE": "1", "LAUNCHERS_PER_NODE": "2"},
                  [*args, f"run.output_dir={two_dir}"],
                  ["--ntasks-per-node=2", "--cpus-per-task=1"])  # fmt: skip
    one = _submit(tmp_path, {**env, "NPROC_PER_NODE": "2"}, [*args, f"run.output_dir={one_dir}"])
    texts = {}
    try:
        for name, (job, out) in (("two", two), ("one", one)):
            info = _wait(job, out, 600)
            texts[name] = out.read_text()
            assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", texts[name][
                -5000:
            ]
    finally:
        for job, out in (two, one):
            _cleanup(job, _port(out.read_text()) if out.exists() else None)
    cmd = next(x for x in texts["two"].splitlines() if x.startswith("alsace-slurm: command:"))
    assert "--ntasks-per-node=2" in cmd and "--nnodes 2 --nproc_per_node 1" in cmd, cmd
    assert "--node_rank" in cmd and "SLURM_PROCID" in cmd
    for text in texts.values():
        assert "2 rank(s) on cpu" in text
        assert "1 data-parallel group(s) x 2 rank(s) sharing each example" in text, text[-3000:]
    a, b = _curves(two_dir), _curves(one_dir)
    assert set(a) == {"stage0/train/loss", "distill/train/loss"} and sorted(
        a["distill/train/loss"]
    ) == [1, 2, 3, 4]
    assert a == b  # bit-identical: same world, same reduction order
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (two_dir, one_dir))
    for key in ("teachers", "students", "before", "after", "param_change"):
        assert ra[key] == rb[key], key
    sa, sb = (json.loads((d / "selection.json").read_text()) for d in (two_dir, one_dir))
    assert sa["languages"] == sb["languages"]


def test_gpu_job_refuses_an_inherited_cpu_accelerator(cluster, tmp_path):
    """A shell that exported DS_ACCELERATOR=cpu (e.g. after `make test`) submits a GPU job:
    the job must fail with the reason, not train on the CPU."""
    env = {"ALSACE_DRY_RUN": "1", "NPROC_PER_NODE": "2", "DS_ACCELERATOR": "cpu"}
    job, out = _submit(tmp_path, env, ["--config", "configs/default.yaml"])
    info = _wait(job, out, 60)
    text = out.read_text()
    _cleanup(job, None)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", (info, text)
    assert "alsace-slurm: DS_ACCELERATOR=cpu is set (inherited from the submitting shell?)" in text
    assert "alsace-slurm: command:" not in text
