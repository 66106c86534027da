"""Typed config: strict loading, dotted overrides, all errors at once; every config file valid;
the DeepSpeed JSON filled in one place with the batch identity asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alsace_ds.config import Config, ConfigError, load_config
from alsace_ds.engine.ds_config import build_ds_config, fill_auto, load_template
from alsace_ds.tools.real import ASSET_KEYS

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def test_defaults_load_and_overrides_are_typed():
    cfg = load_config(None, ["distill.lr=1e-6", "stage0.epochs=2", "task.languages=[en,qaa]"])
    assert isinstance(cfg, Config)
    assert cfg.distill.lr == pytest.approx(1e-6) and isinstance(cfg.distill.lr, float)
    assert cfg.stage0.epochs == 2.0
    assert cfg.task.languages == ["en", "qaa"]


def test_yaml_scientific_notation_is_a_number(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("distill:\n  lr: 3e-8\n")  # YAML 1.1 would read a string
    assert load_config(p).distill.lr == pytest.approx(3e-8)


def test_all_errors_reported_at_once(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("distill:\n  lrr: 1\nmodel:\n  family: bert\nbogus: {}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, ["stage0.micro_batch=0", "selection.threshold=abc", "run.seed=x"])
    msg = str(ei.value)
    assert len(ei.value.problems) == 6 and msg.startswith(f"6 problem(s) in {p}"), msg
    for needle in (
        "distill.lrr: unknown key",
        "bogus: unknown key",
        "model.family: 'bert' is not one of",
        "stage0.micro_batch: must be > 0",
        "selection.threshold: expected a number",
        "run.seed: expected an integer",
    ):
        assert needle in msg, msg
    assert str(p) in msg


def test_semantic_checks():
    with pytest.raises(ConfigError) as ei:
        load_config(
            None,
            [
                "task.name=jsonl",
                "task.languages=[en,fr,en]",
                "distill.pairs=sideways",
                "deepspeed.config=nope.json",
                "model.dropout=1.5",
            ],
        )
    msg = str(ei.value)
    assert "task.train_file: required" in msg
    assert "task.languages: duplicate codes" in msg
    pairs = "['ordered', 'unordered', 'teachers_only']"
    assert f"distill.pairs: 'sideways' is not one of {pairs}" in msg
    assert "deepspeed.config: no such file 'nope.json'" in msg
    assert "model.dropout: must be in [0, 1)" in msg


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["distill.lr"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    # the real experiment's config gets its model and files from `python -m alsace_ds.tools.real`
    fill = (
        [f"{k}=filled-by-the-driver" for k in ASSET_KEYS]
        if path.name == "real-multiemo.yaml"
        else []
    )
    cfg = load_config(path, fill)
    for stage in (cfg.stage0, cfg.distill):
        ds = build_ds_config(cfg, stage, 2)
        assert ds["train_batch_size"] == stage.micro_batch * stage.grad_accum * 2


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_every_ds_config_fills_completely(path):
    cfg = load_config(
        None, [f"deepspeed.config={path}", "distill.micro_batch=4", "distill.grad_accum=3"]
    )
    ds = build_ds_config(cfg, cfg.distill, 5)
    text = json.dumps(ds)
    assert '"auto"' not in text
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 60
    assert ds["zero_optimization"]["stage"] in (1, 2, 3)


def test_zero_stage_override_and_persistence_threshold():
    cfg = load_config(
        None,
        ["deepspeed.config=ds_configs/zero3.json", "deepspeed.param_persistence_threshold=0"],
    )
    ds = build_ds_config(cfg, cfg.stage0, 2)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    cfg = load_config(None, ["deepspeed.zero_stage=1"])
    assert build_ds_config(cfg, cfg.stage0, 2)["zero_optimization"]["stage"] == 1


def test_batch_size_that_does_not_divide(tmp_path):
    """A fixed train_batch_size in the JSON that disagrees with micro x accum x world."""
    tpl = load_template(ROOT / "ds_configs" / "zero2.json")
    tpl["train_batch_size"] = 30
    p = tmp_path / "fixed.json"
    p.write_text(json.dumps(tpl))
    cfg = load_config(None, [f"deepspeed.config={p}", "stage0.micro_batch=8"])
    with pytest.raises(ConfigError) as ei:
        build_ds_config(cfg, cfg.stage0, 2)
    assert "'train_batch_size' is 30 but our config says 16" in str(ei.value)
    assert str(p) in str(ei.value)


def test_fill_auto_reports_unfilled_and_mismatch():
    tpl = {"a": "auto", "b": {"c": "auto"}, "d": 1}
    with pytest.raises(ConfigError) as ei:
        fill_auto(tpl, {"a": 1, "d": 2}, "x.json")
    msg = str(ei.value)
    assert "'b.c' is \"auto\" but nothing fills it" in msg
    assert "'d' is 1 but our config says 2" in msg
    assert fill_auto(tpl, {"a": 1, "b.c": 2, "d": 1}, "x.json") == {"a": 1, "b": {"c": 2}, "d": 1}


def test_user_json_without_the_keys_the_config_decides(tmp_path):
    """A JSON that leaves out gradient_clipping, bf16/fp16, torch_autocast and the batch keys
    gets the config's values (before: clipping and bf16 silently DeepSpeed's defaults, and a
    KeyError without the batch keys)."""
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10}))
    cfg = load_config(
        None,
        [f"deepspeed.config={p}", "deepspeed.gradient_clipping=0.5", "model.dtype=bf16",
         "distill.micro_batch=4", "distill.grad_accum=3"],
    )  # fmt: skip
    ds = build_ds_config(cfg, cfg.distill, 2)
    assert ds == {
        "zero_optimization": {"stage": 2},  # no stage-3 key for a ZeRO-2 JSON
        "steps_per_print": 10,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 3,
        "train_batch_size": 24,
        "gradient_clipping": 0.5,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
    }
    p.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    ds = build_ds_config(cfg, cfg.stage0, 2)
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 100000


def test_user_json_that_disagrees_names_the_config_field(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"gradient_clipping": 2.0, "fp16": {"enabled": True}}))
    cfg = load_config(None, [f"deepspeed.config={p}"])
    with pytest.raises(ConfigError) as ei:
        build_ds_config(cfg, cfg.stage0, 1)
    assert ei.value.problems == [
        f"{p}: 'gradient_clipping' is 2.0 but our config says 1.0 (deepspeed.gradient_clipping) "
        '(write "auto" there to let the config decide)',
        f"{p}: 'fp16.enabled' is True but our config says False (model.dtype: fp32 or bf16) "
        '(write "auto" there to let the config decide)',
    ]


def test_renamed_stage_sections():
    with pytest.raises(ConfigError) as ei:
        load_config(None, ["stage1.threshold=0.2", "stage2.lr=1e-4", "stage3.x=1"])
    assert ei.value.problems[:2] == [
        "stage1: renamed to 'selection' (the stages are stage0, selection, distill); write the "
        "section as 'selection:'",
        "stage2: renamed to 'distill' (the stages are stage0, selection, distill); write the "
        "section as 'distill:'",
    ]
    assert ei.value.problems[2].startswith("stage3: unknown key")


def test_fields_that_would_be_ignored_or_mean_nothing():
    with pytest.raises(ConfigError) as ei:
        load_config(
            None,
            ["task.name=xnli", "model.name_or_path=xlm-roberta-large", "model.head=cloze",
             "model.label_words=[a,b,c]", "stage0.init_from=some/model",
             "selection.teachers=[all,en]", "task.languages=[en,fr]", 'run.output_dir="  "',
             "deepspeed.gradient_clipping=-1"],
        )  # fmt: skip
    assert ei.value.problems == [
        "model.label_words: not used with a template file (Hub tasks, model.prompts_file): the "
        "label words are the verbalizers written there",
        "stage0.init_from: only used with stage0.enabled=false (stage 0 is then skipped and "
        "distill starts from that folder); with stage 0 enabled it would be ignored",
        "selection.teachers: 'all' stands alone ([all]), got ['all', 'en']",
        "deepspeed.gradient_clipping: must be >= 0 (0 = no clipping), got -1.0",
        "run.output_dir: must not be empty (the run would write into the current directory); "
        "name a folder, e.g. runs/my-run",
    ]


def test_jsonl_teachers_and_label_words_checked_with_the_config():
    base = ["task.name=jsonl", "task.languages=[en,fr]", "task.labels=[pos,neg]",
            "task.train_file=a", "task.unlabeled_file=b", "task.test_file=c",
            "model.name_or_path=m", "model.family=mt5"]  # fmt: skip
    with pytest.raises(ConfigError) as ei:
        load_config(None, [*base, "selection.teachers=[en,de,de]", "model.label_words=[good]"])
    assert ei.value.problems == [
        "model.label_words: 1 word(s) ['good'] given, but the task has num_labels=2 (pos, neg): "
        "give one word per label, in that order",
        "selection.teachers: duplicate codes in ['en', 'de', 'de']",
        "selection.teachers: unknown language code(s) 'de', 'de' (not among the languages of task "
        "'jsonl': en, fr)",
    ]


@pytest.mark.parametrize(
    "text,why",
    [
        ("", "is empty"),
        ("- a\n- b\n", "does not hold a config mapping"),
        ("task: [x\n", "is not valid YAML (expected ',' or ']', but got '<stream end>' at line 2, "
                       "column 1)"),
    ],
)  # fmt: skip
def test_a_broken_config_yaml_in_the_run_directory(tmp_path, text, why):
    from alsace_ds.engine.rundir import launch_facts, reuse_problems

    (tmp_path / "stage0").mkdir()
    (tmp_path / "config.yaml").write_text(text)
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    facts = {s: launch_facts(1, 1, 2) for s in ("stage0", "distill")}
    assert reuse_problems(cfg, facts) == [
        f"run.output_dir: {tmp_path / 'config.yaml'} {why}; it records the config that made the "
        "outputs there (config.yaml, stage0), so they cannot be checked against this run: "
        "restore it, or use another run.output_dir"
    ]
