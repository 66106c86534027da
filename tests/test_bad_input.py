"""Bad input stops the real entry point BEFORE training, with a message naming the file, the
row/field and the language, and leaves no run directory behind."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest

from _launch import launch, run_single
from alsace_ds.train import main

ROOT = Path(__file__).resolve().parent.parent

LANGS = ["en", "fr", "de"]
LABELS = ["entailment", "neutral", "contradiction"]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(i: int, label=0, **text) -> dict:
    views = {lang: f"sentence {i} in {lang}" for lang in LANGS}
    views.update(text)
    return {"id": f"ex-{i}", "label": label, "text": views}


@pytest.fixture
def files(tmp_path):
    good = [_row(i, label=i % 3) for i in range(1, 6)]
    return {
        "train": _write(tmp_path / "train.jsonl", [{"label": 1, "text": {"en": "hi there"}}]),
        "unlabeled": _write(tmp_path / "unlabeled.jsonl", good),
        "test": _write(tmp_path / "test.jsonl", good),
    }


def _run(tmp_path, files, capsys, extra=()):
    out = tmp_path / "run"
    args = [
        "task.name=jsonl",
        f"task.languages=[{','.join(LANGS)}]",
        f"task.labels=[{','.join(LABELS)}]",
        f"task.train_file={files['train']}",
        f"task.unlabeled_file={files['unlabeled']}",
        f"task.test_file={files['test']}",
        "model.name_or_path=xlm-roberta-large",  # never loaded: the input is rejected first
        f"run.output_dir={out}",
        *extra,
    ]
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert not out.exists(), "a rejected run must not leave a run directory"
    return err


def test_row_missing_a_language(tmp_path, files, capsys):
    rows = [_row(1), {"id": "ex-2", "label": 0, "text": {"en": "a", "fr": "b"}}]
    _write(files["unlabeled"], rows)
    err = _run(tmp_path, files, capsys)
    assert f"{files['unlabeled']}:2" in err and "ex-2" in err
    assert "text.de" in err and "'de'" in err


def test_empty_text(tmp_path, files, capsys):
    _write(files["test"], [_row(1), _row(2), _row(3, fr="   ")])
    err = _run(tmp_path, files, capsys)
    assert f"{files['test']}:3" in err and "text.fr" in err and "empty" in err


def test_label_outside_label_set(tmp_path, files, capsys):
    _write(files["test"], [_row(1), _row(2, label=7), _row(3, label="maybe")])
    err = _run(tmp_path, files, capsys)
    t = files["test"]
    assert f"{t}:2 (id 'ex-2'): label 7 is out of range (label must be in 0..2 or one of" in err
    assert f"{t}:3 (id 'ex-3'): label 'maybe' is not a known label name" in err
    assert "2 problems" in err


def test_unknown_language_code(tmp_path, files, capsys):
    _write(files["unlabeled"], [_row(1, xx="hello")])
    err = _run(tmp_path, files, capsys)
    assert f"{files['unlabeled']}:1" in err and "'xx'" in err and "unknown language" in err


def test_unknown_config_key(tmp_path, files, capsys):
    err = _run(tmp_path, files, capsys, ["distill.learning_rate=1e-5", "stage0.epoch=3"])
    assert "distill.learning_rate: unknown key" in err and "stage0.epoch: unknown key" in err


def test_batch_size_that_does_not_divide(tmp_path, files, capsys):
    tpl = json.loads((Path(__file__).parent.parent / "ds_configs" / "zero2.json").read_text())
    tpl["train_batch_size"] = 10
    ds = tmp_path / "fixed.json"
    ds.write_text(json.dumps(tpl))
    err = _run(tmp_path, files, capsys, [f"deepspeed.config={ds}", "stage0.micro_batch=4"])
    assert str(ds) in err and "'train_batch_size' is 10 but our config says 4" in err


def test_missing_file(tmp_path, files, capsys):
    files["test"].unlink()
    err = _run(tmp_path, files, capsys)
    assert f"  - {files['test']}: file not found\n" in err


# ----------------------------------------------------------------------------- refused before
# any training: the real entry point (in-process main: every one of these fails before any
# process group exists), the exact message, no run directory, no stage-0 line, one message.


@pytest.fixture
def embedded(cache, monkeypatch):
    """The embedded task, built once per module in the module's ALSACE_CACHE."""
    monkeypatch.setenv("ALSACE_CACHE", str(cache))
    from alsace_ds.data.embedded import build_embedded

    return {family: build_embedded(cache, family) for family in ("xlmr", "mt5")}


# Should a check ever let a bad run through, it stops after one step (exit 75), not minutes on.
CHEAP = ["run.stop_after_steps=1", "log.progress=false", "log.tensorboard=false"]


def _refused(args: list[str], capsys, out: Path | None) -> str:
    """main(args) must exit 2 before training: one error message, nothing in ``out``."""
    rc = main([*CHEAP, *(["run.output_dir=" + str(out)] if out is not None else []), *args])
    cap = capsys.readouterr()
    assert rc == 2, cap.out + cap.err
    assert cap.err.count("alsace_ds: error:") == 1, cap.err
    assert "Traceback" not in cap.err and "stage 0" not in cap.out, cap.out + cap.err
    if out is not None:
        assert not out.exists(), f"a refused run wrote {sorted(out.rglob('*'))}"
    return cap.err


def _problem(err: str) -> str:
    """The single problem line of an error message (without its '  - ' bullet)."""
    lines = [x[4:] for x in err.splitlines() if x.startswith("  - ")]
    assert len(lines) == 1, err
    return lines[0]


EMBEDDED_LANGS = "en, qaa, qab, qac, qad, qae, qaf"
XNLI_LANGS = "en, fr, es, de, el, bg, ru, tr, ar, vi, th, zh, hi, sw, ur"


@pytest.mark.parametrize(
    "task,teachers,expected",
    [
        ("embedded", "[en,qzz]", f"unknown language code(s) 'qzz' (not among the languages of "
                                 f"task 'embedded': {EMBEDDED_LANGS})"),
        ("embedded", "[qzz]", f"unknown language code(s) 'qzz' (not among the languages of "
                              f"task 'embedded': {EMBEDDED_LANGS})"),
        ("embedded", "[]", f"[] names no teacher language; list some of the languages of task "
                           f"'embedded': {EMBEDDED_LANGS}; or write [all] for every language, "
                           "or leave it null (teachers chosen by the vote)"),
        ("xnli", "[en,qzz]", f"unknown language code(s) 'qzz' (not among the languages of "
                             f"task 'xnli': {XNLI_LANGS})"),
    ],
)  # fmt: skip
def test_selection_teachers_outside_the_task(tmp_path, embedded, capsys, task, teachers, expected):
    args = [f"task.name={task}", f"selection.teachers={teachers}"]
    if task == "xnli":  # refused before any dataset or model is looked up
        args.append("model.name_or_path=xlm-roberta-large")
    err = _refused(args, capsys, tmp_path / "run")
    assert _problem(err) == f"selection.teachers: {expected}"


def test_mt5_label_words_of_the_wrong_count(tmp_path, embedded, capsys):
    words = ["model.family=mt5", "model.label_words=[sports,politics]"]
    err = _refused(words, capsys, tmp_path / "run")
    assert _problem(err) == (
        "model.label_words: 2 word(s) ['sports', 'politics'] given, but the task has num_labels=3 "
        "(sports, politics, science): give one word per label, in that order"
    )


def test_max_length_above_the_position_table(tmp_path, embedded, capsys):
    model = embedded["xlmr"].model_dir
    err = _refused(["model.max_length=35"], capsys, tmp_path / "run")
    assert _problem(err) == (
        f"model.max_length: 35 tokens is more than the model {model} takes: 34 "
        "(max_position_embeddings 36 minus 2: xlm-roberta position ids start at "
        "pad_token_id + 1 = 2); set model.max_length <= 34"
    )


def test_the_position_limit_is_the_models_own(embedded):
    """34 tokens run through the embedded XLM-R, 35 do not (transformers numbers RoBERTa
    positions from pad_token_id + 1); mT5's relative positions have no limit."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from alsace_ds.config import load_config
    from alsace_ds.data.tasks import model_config_problems

    xlmr = str(embedded["xlmr"].model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(xlmr)
    with torch.no_grad():
        model(input_ids=torch.full((1, 34), 5))
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=torch.full((1, 35), 5))
    assert model_config_problems(load_config(None, ["model.max_length=34"]), xlmr) == []
    mt5 = load_config(None, ["model.family=mt5", "model.max_length=4096"])
    assert model_config_problems(mt5, str(embedded["mt5"].model_dir)) == []


def test_k_shot_above_the_training_set(tmp_path, embedded, capsys):
    err = _refused(["task.k_shot=5000"], capsys, tmp_path / "run")
    assert _problem(err) == (
        "task.k_shot: 5000 is more than the 2000 examples of the English training set "
        f"{embedded['xlmr'].train_file}; set task.k_shot <= 2000 (or null: all)"
    )


@pytest.mark.parametrize(
    "field,args",
    [
        ("model.name_or_path", ["model.name_or_path={}"]),
        ("stage0.init_from", ["stage0.enabled=false", "stage0.init_from={}"]),
    ],
)
def test_missing_model_folder(tmp_path, embedded, capsys, field, args):
    missing = tmp_path / "models" / "fine-tuned"
    err = _refused([a.format(missing) for a in args], capsys, tmp_path / "run")
    assert _problem(err) == f"{field}: no such model folder '{missing}'"


def test_output_dir_under_a_file(tmp_path, embedded, capsys):
    (tmp_path / "a-file").write_text("not a folder\n")
    out = tmp_path / "a-file" / "sub"
    err = _refused([], capsys, out)
    assert _problem(err) == (
        f"run.output_dir: {out} cannot be created: {tmp_path / 'a-file'} is a file, not a folder"
    )


def test_output_dir_that_cannot_be_written(embedded, capsys):
    # (tests run as root, whom chmod does not stop; nobody can make a folder in /proc)
    err = _refused([], capsys, Path("/proc/alsace-ds-run"))
    assert _problem(err) == (
        "run.output_dir: /proc/alsace-ds-run cannot be written: making a folder in /proc fails "
        "(No such file or directory)"
    )


@pytest.fixture
def full_fs(tmp_path):
    """A tiny tmpfs filled to the last byte (needs the right to mount, else skipped)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        with open(mnt / "filler", "wb", buffering=0) as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"x" * 4096)  # until ENOSPC
        yield mnt
    finally:  # lazily if a (broken) run still holds a file open there
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_output_dir_on_a_full_filesystem(full_fs, embedded, capsys):
    err = _refused([], capsys, full_fs / "run")
    weights = (embedded["xlmr"].model_dir / "model.safetensors").stat().st_size / 2**20
    assert _problem(err) == (
        f"run.output_dir: the filesystem of {full_fs} has 0.0 MiB free, less than the "
        f"{4 * weights + 16:.1f} MiB this run writes at the very least (2 training stage(s) x "
        f"(one export + one checkpoint) of {weights:.1f} MiB of weights, plus 16.0 MiB of "
        "reports; a checkpoint with optimizer state takes about 4x the weights): free some "
        "space, or choose another run.output_dir"
    )


def test_empty_output_dir(tmp_path, embedded, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _refused(['run.output_dir=""'], capsys, None)
    assert _problem(err) == (
        "run.output_dir: must not be empty (the run would write into the current directory); "
        "name a folder, e.g. runs/my-run"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_empty_config_file(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    err = _refused(["--config", str(path)], capsys, tmp_path / "run")
    assert err.startswith(f"alsace_ds: error: 1 problem(s) in {path}:")
    assert _problem(err) == (
        f"{path}: the file holds no settings (empty, or only comments); it would run on the "
        "built-in defaults: write the sections you mean (e.g. start from configs/default.yaml)"
    )


def test_old_stage_keys_name_the_new_ones(tmp_path, capsys):
    path = tmp_path / "old.yaml"
    path.write_text("stage1:\n  threshold: 0.2\nstage2:\n  lr: 1.0e-4\n")
    rc = main(["--config", str(path), f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "run").exists()
    assert err == (
        f"alsace_ds: error: 2 problem(s) in {path}:\n"
        "  - stage1: renamed to 'selection' (the stages are stage0, selection, distill); write "
        "the section as 'selection:'\n"
        "  - stage2: renamed to 'distill' (the stages are stage0, selection, distill); write "
        "the section as 'distill:'\n"
    )


def test_overrides_before_and_after_config(tmp_path, capsys):
    cfg = ROOT / "configs" / "default.yaml"
    rc = main(["distill.lrr=1", "--config", str(cfg), "stage0.epoch=3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "distill.lrr: unknown key" in err and "stage0.epoch: unknown key" in err


# ----------------------------------------------------------------------------- through the
# launcher: a user's DeepSpeed JSON gets the config's values; a broken run directory is
# refused with ONE message from 2 ranks.


@pytest.mark.launch
def test_user_deepspeed_json_gets_the_configs_values(tmp_path, cache):
    """A JSON without gradient_clipping, bf16 or the batch keys: the engine gets the config's
    values (read back from the checkpoint DeepSpeed wrote, which stores the config it ran)."""
    ds = tmp_path / "mine.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    out = tmp_path / "run"
    res = run_single(
        [f"run.output_dir={out}", f"deepspeed.config={ds}", "model.dtype=bf16",
         "deepspeed.gradient_clipping=0.25", "stage0.micro_batch=8", "stage0.grad_accum=2",
         "run.stop_after_steps=1", "eval.every_epoch=false", "log.tensorboard=false",
         "log.progress=false"],
        cache, timeout=300,
    )  # fmt: skip
    assert res.returncode == 75, res.stdout[-3000:]  # stopped after one step, committed
    from alsace_ds.engine.checkpoint import safe_load

    tag = (out / "checkpoints" / "stage0" / "latest").read_text().strip()
    state = safe_load(out / "checkpoints" / "stage0" / tag / "mp_rank_00_model_states.pt")
    got = state["ds_config"]
    assert got["gradient_clipping"] == 0.25
    assert got["bf16"] == {"enabled": False} and got["fp16"] == {"enabled": False}
    assert got["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert (got["train_micro_batch_size_per_gpu"], got["gradient_accumulation_steps"]) == (8, 2)
    assert got["train_batch_size"] == 16


@pytest.mark.launch
def test_missing_config_yaml_in_a_run_directory(tmp_path, cache):
    out = tmp_path / "run"
    (out / "stage0").mkdir(parents=True)
    res = run_single([f"run.output_dir={out}"], cache, timeout=300)
    assert res.returncode == 2, res.stdout[-3000:]
    assert res.stdout.count("alsace_ds: error:") == 1 and "Traceback" not in res.stdout
    assert (
        f"  - run.output_dir: {out} holds outputs (stage0) but no config.yaml, so the config "
        "that made them is unknown; use another output_dir\n"
    ) in res.stdout
    assert sorted(p.name for p in out.iterdir()) == [".lock", "stage0"]
    assert list((out / "stage0").iterdir()) == []


@pytest.mark.launch
def test_corrupt_config_yaml_is_reported_once_by_two_ranks(tmp_path, cache):
    """Rank 0 reads the run directory and reports; rank 1 only hears that rank 0 failed
    (PeerError) and stays silent: the message appears exactly once."""
    out = tmp_path / "run"
    (out / "results").mkdir(parents=True)
    (out / "config.yaml").write_text("task: [embedded\n")
    res = launch([f"run.output_dir={out}"], cache, timeout=300, launcher="deepspeed")
    assert res.returncode == 2, res.stdout[-3000:]
    message = (
        "alsace_ds: error: 1 problem(s) in run.output_dir:\n"
        f"  - run.output_dir: {out / 'config.yaml'} is not valid YAML (expected ',' or ']', but "
        "got '<stream end>' at line 2, column 1); it records the config that made the outputs "
        "there (config.yaml, results), so they cannot be checked against this run: restore it, "
        "or use another run.output_dir\n"
    )
    assert res.stdout.count(message) == 1, res.stdout[-3000:]
    assert res.stdout.count("alsace_ds: error") == 1
    assert "Traceback" not in res.stdout and "rank 0 failed" not in res.stdout
    assert "stage 0" not in res.stdout
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "results"]
    assert (out / "config.yaml").read_text() == "task: [embedded\n"
