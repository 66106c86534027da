"""One typed configuration for a whole ALSACE run.

Dataclasses are the schema. A YAML file and dotted command-line overrides
(``distill.lr=1e-4``) are merged into a plain dict, then converted strictly:
unknown keys and wrongly typed values are *collected*, then semantic checks run,
and every problem is reported at once in a single :class:`ConfigError` (the style
of nanotron's strict loading and litgpt's ``validate_args``), before any process
group, model or GPU is touched.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from alsace_ds.models.families import FAMILIES, HEADS

EMBEDDED = "embedded"
HUB_TASKS = ("xnli", "pawsx", "xcopa")  # loaded by name with `datasets` (alsace_ds.data.hub)
TASK_NAMES = (EMBEDDED, "jsonl", *HUB_TASKS)
REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_path(path: str | Path) -> Path:
    """A relative path is looked up in the working directory, then in the repository root
    (so ``ds_configs/zero2.json`` works whichever directory the launcher starts in)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


class ConfigError(ValueError):
    """All problems of a configuration, one per line."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    log_every: int = 5
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end of a stage
    # Also commit when this many minutes passed since the last commit (rank 0's clock, agreed
    # at the next step); 0 = off; null = 30 inside a Slurm job (where preemption and node
    # failures are expected: at most that much work is lost), else off.
    checkpoint_minutes: float | None = None
    keep_checkpoints: int = 2  # newest checkpoints kept per stage (older ones are deleted)
    # "auto": continue from the latest committed checkpoint in output_dir (after preemption or
    # a stop); "never": start from scratch (refused if output_dir already holds checkpoints).
    resume: Literal["auto", "never"] = "auto"
    stop_after_steps: int | None = None  # stop (checkpoint, exit 75) after this many steps


@dataclass
class TaskConfig:
    # "embedded": the synthetic parallel task built locally (alsace_ds.data.embedded);
    # "jsonl": your own files in the documented JSONL format (alsace_ds.data.corpus);
    # "xnli" | "pawsx" | "xcopa": loaded by name with `datasets` (alsace_ds.data.hub).
    name: str = EMBEDDED
    languages: list[str] = field(default_factory=list)  # empty = all the task's languages
    # The reference language of the transfer gap and of stage 0; null = none (XCOPA has no
    # English view: accuracies only, as in the paper's Table 9).
    english: str | None = "en"
    labels: list[str] = field(default_factory=list)  # empty = the task's own label names
    # jsonl: one file per role.
    train_file: str | None = None  # English, labeled (stage 0)
    unlabeled_file: str | None = None  # parallel, labels ignored (stages 1-2)
    dev_file: str | None = None  # parallel, labeled (monitoring during training)
    test_file: str | None = None  # parallel, labeled (before/after report)
    # Hub tasks: the dataset (Hub id, or a local folder with the same layout; null = the
    # task's Hub id) and one split per role; "validation[:500]" style slices are applied
    # after the views are joined. null = the task's default (see alsace_ds.data.tasks).
    source: str | None = None
    train_source: str | None = None  # XCOPA's English training set (COPA); null = aps/super_glue
    train_split: str | None = None
    unlabeled_split: str | None = None
    dev_split: str | None = None
    test_split: str | None = None
    max_unlabeled: int | None = 500  # the paper uses the first 500 parallel examples
    k_shot: int | None = None  # limited-resource stage 0: k English training examples
    # The unlabeled corpus must not share examples with the test/dev sets (compared by the
    # text of their views); true runs anyway and says so in the report.
    allow_overlap: bool = False


@dataclass
class ModelConfig:
    family: str = "xlmr"  # "xlmr" | "mt5"
    name_or_path: str = EMBEDDED  # a local folder, a Hub name, or "embedded"
    # xlmr: "classification" (sequence-classification head, default) | "cloze" (a template
    # with the mask token, read at one verbalizer word per label); mt5: "label_words"
    # (scored at the first decoder step). null = the family's default.
    head: str | None = None
    # Templates and verbalizers (alsace_ds/data/templates/<task>.yaml by default): a YAML file in
    # the same format to use your own. Used by cloze / label_words on Hub tasks.
    prompts_file: str | None = None
    # jsonl/embedded tasks: one word per label shared by all languages (default: label names)
    label_words: list[str] | None = None
    max_length: int = 128
    dropout: float | None = None  # None keeps the checkpoint's value
    # Keep the input word embeddings fixed in both training stages (a common choice for
    # zero-shot cross-lingual transfer; for a small model with a 250k vocabulary it is also
    # most of the parameters, so most of the optimizer work and gradient traffic).
    freeze_embeddings: bool = False
    # "auto": bf16 for mT5 (fp16 overflows in mT5), fp32 for XLM-R. Softmax / KL are fp32.
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # fp32 on an NVIDIA GPU: matmuls in TF32 (10-bit mantissa products, fp32 sums; about 8x
    # the fp32 rate on A100/H100). Parameters, optimizer and softmax/KL stay fp32.
    tf32: bool = True

    @property
    def resolved_head(self) -> str:
        return self.head or HEADS.get(self.family, ("classification",))[0]

    @property
    def resolved_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bf16" if self.family == "mt5" else "fp32"


@dataclass
class Stage0Config:
    """English fine-tuning (cross-entropy on the English training set)."""

    enabled: bool = True
    init_from: str | None = None  # skip stage 0 and start from this fine-tuned HF folder
    epochs: float = 3.0
    lr: float = 2e-5
    micro_batch: int = 16  # examples per rank per micro-step (with global_batch: at most)
    grad_accum: int = 1
    # Examples per optimizer step over all ranks. At launch each data-parallel rank gets
    # global_batch / ranks of them (must be whole), split into micro-steps of the largest size
    # <= micro_batch that divides that share; grad_accum is the rest. Presets use it, so the
    # paper's batch holds on any number of GPUs (README, "Presets on any cluster").
    global_batch: int | None = None
    # Learning rate after warm-up: "linear" decays to 0 at the last step; "constant" stays at
    # lr (DeepSpeed's WarmupLR, the authors' stage-2 schedule). Warm-up is linear.
    schedule: Literal["linear", "constant"] = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_steps: int | None = None
    # Evaluate on the dev set after every epoch (eval.every_epoch) and keep the best model by
    # English dev accuracy ("english", the zero-shot protocol: no target-language labels) or
    # by the average over languages ("average"); stage 2 starts from it. false = last epoch.
    keep_best: bool = True
    best_metric: Literal["english", "average"] = "english"


@dataclass
class SelectionConfig:
    threshold: float | None = None  # None = mean of shat_t (= 1/|T|); paper appendix: 0.06/0.2/0.2
    batch_size: int = 64  # views per forward during inference
    # Override the vote: "all" = every language a teacher (the paper's no-selection ablation),
    # or an explicit list of language codes. None = teachers chosen by the vote.
    teachers: list[str] | None = None
    # Registered in alsace_ds.recipes.strategies.SELECTION_RULES: "threshold" (the paper's vote),
    # "fixed" (= selection.teachers; implied when teachers is set), and the Table 3 ablations
    # "random" (a run.seed-seeded sample of as many languages as the vote picks) and "scale"
    # (that many languages with the most pre-training data, from selection.corpus_sizes).
    rule: str = "threshold"
    # The per-language pre-training sizes of rule "scale" (alsace_ds.data.pretraining): "auto"
    # (by model.family: cc100 for xlmr, mc4 for mt5; the synthetic table for the embedded
    # task), a table name ("cc100", "mc4", "embedded") or a JSON file {language code: size}.
    corpus_sizes: str = "auto"


@dataclass
class DistillConfig:
    """Cross-lingual self-distillation (paper Eq. 4-5) on the unlabeled parallel corpus."""

    enabled: bool = True
    epochs: float = 2.0
    lr: float = 3e-8  # the paper's value for large models
    micro_batch: int = 8  # examples per rank per micro-step; each brings all its language views
    grad_accum: int = 1
    global_batch: int | None = None  # examples per optimizer step (as in stage0)
    schedule: Literal["linear", "constant"] = "linear"  # as in stage0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_steps: int | None = None
    # Ranks per view group: the group shares each example and splits its language views
    # (one forward per rank over its views, then a differentiable all-gather); 1 = every rank
    # holds all views of its own examples. Must divide the world size. "auto": the smallest
    # size that divides the world and leaves a data-parallel world dividing global_batch
    # (e.g. 24 ranks, global_batch 32: 3 -> 8 view groups of 4 examples), else 1.
    view_parallel_size: int | Literal["auto"] = 1
    # Registered in alsace_ds.method.pairs (PAIR_POLICIES, DIRECTIONS). "teachers_only": the
    # paper's "excluding weak languages from the students" ablation (teacher-teacher pairs).
    pairs: str = "ordered"
    direction: str = "forward"
    detach_teacher: bool = False
    # False: the paper's "excluding weak languages from the teachers" ablation: no gradient
    # reaches a teacher's distribution from a pair whose t1 is a student (same loss value).
    students_teach: bool = True
    # Dev checks: optimizer steps between them (0 = at epoch ends). With eval_every > 0 the
    # checks are at the start, every eval_every steps and at the end, not at epoch ends (a
    # 100-epoch preset would otherwise check 100 times). Each check feeds the collapse guard
    # (alsace_ds.method.guard): English dev accuracy, mean-prediction entropy, agreement with the
    # start, cross-lingual consistency; no target-language labels.
    eval_every: int = 0
    guard: bool = True  # stop early when unhealthy; needs a dev set
    guard_max_en_drop: float = 2.0  # points of English dev accuracy below the start
    guard_min_entropy_ratio: float = 0.5  # mean-prediction entropy vs the start, per language
    guard_patience: int = 1  # unhealthy checks in a row before stopping
    # Percent of dev examples on which every language must keep its start prediction (drift);
    # 0 = off. Off by default: with a large gap, real gains change many predictions (the
    # embedded default moves 23% of a student's predictions while its accuracy rises).
    guard_min_agreement: float = 0.0
    keep_best: bool = (
        True  # report and export the latest healthy check (see alsace_ds.method.guard)
    )
    # "alsace" (teacher selection + self-distillation) or the paper's Table 4 baselines
    # "english_self_training": pseudo-label the unlabeled English views, keep the most
    # confident half, fine-tune on them with cross-entropy (same lr/epochs/batch);
    # "full_self_training": the same over every language's views together.
    method: str = "alsace"  # registered in alsace_ds.recipes.strategies.DISTILL_METHODS


@dataclass
class EvalConfig:
    batch_size: int = 64  # views per forward
    every_epoch: bool = True  # evaluate on the dev file after every epoch of each stage
    # Keep every dev example's per-language predictions of the start and the final model
    # (predictions/dev_{before,after}.safetensors): two more passes over the dev set.
    dev_predictions: bool = True


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"
    zero_stage: int | None = None  # override the JSON's stage (0-3)
    gradient_clipping: float = 1.0
    param_persistence_threshold: int = 100000  # ZeRO-3: 0 partitions even tiny params (tests)
    timeout_s: float = 600.0  # collective timeout: a dead rank fails the job instead of hanging


@dataclass
class LogConfig:
    tensorboard: bool = True
    progress: bool = True
    plots: bool = True  # plots/*.png (and TensorBoard images) at the end of the run


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage0: Stage0Config = field(default_factory=Stage0Config)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(
        tp, _type_name(tp)
    )


def _convert(value: Any, tp: Any, where: str, errors: list[str]) -> Any:
    """Check/convert ``value`` against annotation ``tp``; append problems to ``errors``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            errors.append(f"{where}: must not be null")
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], where, errors)
        for option in inner:  # e.g. int | Literal["auto"]: the first that accepts the value
            trial: list[str] = []
            out = _convert(value, option, where, trial)
            if not trial:
                return out
        errors.append(f"{where}: expected {' or '.join(map(_describe, inner))}, got {value!r}")
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            errors.append(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            errors.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return []
        return [_convert(v, item_tp, f"{where}[{i}]", errors) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_dict(tp, value, where, errors)
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{where}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {_type_name(tp)} at {where}")


#: Keys that were renamed (dotted path -> new name): refused with the new name, never
#: silently dropped.
RENAMED_KEYS = {
    "stage1": "selection",  # the paper's stage 1 (teacher-language selection)
    "stage2": "distill",  # the paper's stage 2 (cross-lingual self-distillation)
}


def _dataclass_from_dict(cls: type, data: Any, where: str, errors: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    for key in data:
        if key in names:
            continue
        renamed = RENAMED_KEYS.get(f"{prefix}{key}")
        if renamed is not None:
            errors.append(
                f"{prefix}{key}: renamed to '{renamed}' (the stages are stage0, selection, "
                f"distill); write the section as '{renamed}:'"
            )
            continue
        errors.append(
            f"{prefix}{key}: unknown key (known keys of '{where or 'config'}': "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {}
    for key, value in data.items():
        if key in names:
            before = len(errors)
            converted = _convert(value, hints[key], f"{prefix}{key}", errors)
            if len(errors) == before:  # a bad value keeps the default so later checks still run
                kwargs[key] = converted
    return cls(**kwargs)


# ----------------------------------------------------------------------------- overrides


def apply_overrides(data: dict[str, Any], overrides: list[str], errors: list[str]) -> None:
    """Apply ``a.b.c=value`` overrides in place; ``value`` is parsed as YAML (``1e-5`` -> float)."""
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r}: expected key=value (e.g. distill.lr=1e-6)")
            continue
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            errors.append(f"override {item!r}: empty key part")
            continue
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                errors.append(f"override {item!r}: '{part}' is not a section")
                break
            node = child
        else:
            node[parts[-1]] = _parse_scalar(raw)


def _parse_scalar(raw: str) -> Any:
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML 1.1 reads "1e-5" as a string; numbers are what users mean.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def _read_yaml(path: Path, errors: list[str]) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        errors.append(f"{path}: cannot read config file ({exc.strerror})")
        return {}
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        errors.append(f"{path}: invalid YAML: {exc}")
        return {}
    if data is None or data == {}:
        errors.append(
            f"{path}: the file holds no settings (empty, or only comments); it would run on "
            "the built-in defaults: write the sections you mean (e.g. start from "
            "configs/default.yaml)"
        )
        return {}
    if not isinstance(data, dict):
        errors.append(f"{path}: top level must be a mapping of sections")
        return {}
    _floatify(data)
    return data


def _floatify(node: dict[str, Any]) -> None:
    """YAML 1.1 leaves '3e-8' as a string; turn such strings into floats."""
    for key, value in node.items():
        if isinstance(value, dict):
            _floatify(value)
        elif isinstance(value, str):
            try:
                if any(c in value for c in "eE") and value.strip()[0] in "0123456789.+-":
                    node[key] = float(value)
            except (ValueError, IndexError):
                pass


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + dotted overrides -> validated :class:`Config`, or ConfigError."""
    errors: list[str] = []
    source = str(path) if path else "config"
    data = _read_yaml(Path(path), errors) if path else {}
    apply_overrides(data, overrides or [], errors)
    cfg = _dataclass_from_dict(Config, data, "", errors)
    try:
        errors.extend(validate(cfg))
    except (TypeError, ValueError):
        # A wrongly typed value (already reported above) can trip a semantic check;
        # the type problems are the ones to fix first.
        if not errors:
            raise
    if errors:
        raise ConfigError(errors, source)
    return cfg


# ----------------------------------------------------------------------------- semantics


def _positive(errors: list[str], where: str, value: float | int | None, allow_none=False) -> None:
    if value is None and allow_none:
        return
    if value is None or not (value > 0) or (isinstance(value, float) and not math.isfinite(value)):
        errors.append(f"{where}: must be > 0, got {value!r}")


def validate(cfg: Config) -> list[str]:
    """Semantic checks that need several fields, one short function per section; returns
    every problem found."""
    errors: list[str] = []
    for check in (_check_task, _check_model, _check_training_stages, _check_distill,
                  _check_selection, _check_deepspeed, _check_run):  # fmt: skip
        check(cfg, errors)
    return errors


def _check_task(cfg: Config, errors: list[str]) -> None:
    t, m = cfg.task, cfg.model
    hub = t.name in HUB_TASKS
    if t.name not in TASK_NAMES:
        errors.append(f"task.name: {t.name!r} is not one of {list(TASK_NAMES)}")
    if m.name_or_path == EMBEDDED and (hub or t.name == "jsonl"):
        errors.append("model.name_or_path: 'embedded' only goes with task.name 'embedded'")
    if not hub:
        for key in ("source", "train_source", "train_split", "unlabeled_split", "dev_split",
                    "test_split"):  # fmt: skip
            if getattr(t, key) is not None:
                errors.append(f"task.{key}: only used by the Hub tasks {list(HUB_TASKS)}")
    if t.name == "jsonl":
        _check_jsonl(cfg, errors)
    if len(set(t.languages)) != len(t.languages):
        errors.append(f"task.languages: duplicate codes in {t.languages}")
    if t.english is None and not hub:
        errors.append("task.english: null is only for Hub tasks without an English view (xcopa)")
    # (Hub tasks: checked once their defaults are known; XCOPA's default reference is none.)
    if t.languages and t.english is not None and t.english not in t.languages and not hub:
        errors.append(f"task.english: {t.english!r} is not in task.languages {t.languages}")
    if len(set(t.labels)) != len(t.labels):
        errors.append(f"task.labels: duplicate labels in {t.labels}")
    _positive(errors, "task.max_unlabeled", t.max_unlabeled, allow_none=True)
    _positive(errors, "task.k_shot", t.k_shot, allow_none=True)


def _check_jsonl(cfg: Config, errors: list[str]) -> None:
    t = cfg.task
    for key in ("train_file", "unlabeled_file", "test_file"):
        if getattr(t, key) is None and not (key == "train_file" and not cfg.stage0.enabled):
            errors.append(f"task.{key}: required when task.name is 'jsonl'")
    if not t.languages:
        errors.append("task.languages: required when task.name is 'jsonl'")
    if not t.labels:
        errors.append("task.labels: required when task.name is 'jsonl'")


def _check_model(cfg: Config, errors: list[str]) -> None:
    t, m = cfg.task, cfg.model
    if m.family not in FAMILIES:
        errors.append(f"model.family: {m.family!r} is not one of {list(FAMILIES)}")
    if m.family in HEADS and m.head is not None and m.head not in HEADS[m.family]:
        errors.append(
            f"model.head: {m.head!r} is not a head of family {m.family!r} "
            f"(valid: {list(HEADS[m.family])})"
        )
    if m.resolved_head == "classification" and m.label_words:
        errors.append("model.label_words: not used by the classification head")
    elif m.label_words is not None and (t.name in HUB_TASKS or m.prompts_file is not None):
        errors.append(
            "model.label_words: not used with a template file (Hub tasks, model.prompts_file): "
            "the label words are the verbalizers written there"
        )
    elif t.labels:
        errors += label_word_problems(m.label_words, t.labels)
    _positive(errors, "model.max_length", m.max_length)
    if m.dropout is not None and not 0.0 <= m.dropout < 1.0:
        errors.append(f"model.dropout: must be in [0, 1), got {m.dropout}")


def label_word_problems(label_words: list[str] | None, labels: list[str]) -> list[str]:
    """``model.label_words`` must give one word per label of the task (its num_labels)."""
    if label_words is None or len(label_words) == len(labels):
        return []
    return [
        f"model.label_words: {len(label_words)} word(s) {label_words} given, but the task has "
        f"num_labels={len(labels)} ({', '.join(labels)}): give one word per label, in that order"
    ]


def _check_training_stages(cfg: Config, errors: list[str]) -> None:
    for name in ("stage0", "distill"):
        st = getattr(cfg, name)
        _positive(errors, f"{name}.epochs", st.epochs)
        _positive(errors, f"{name}.lr", st.lr)
        _positive(errors, f"{name}.micro_batch", st.micro_batch)
        _positive(errors, f"{name}.grad_accum", st.grad_accum)
        _positive(errors, f"{name}.max_steps", st.max_steps, allow_none=True)
        _positive(errors, f"{name}.global_batch", st.global_batch, allow_none=True)
        if st.global_batch is not None and st.grad_accum != 1:
            errors.append(f"{name}: set global_batch or grad_accum, not both")
        if not 0.0 <= st.warmup_ratio < 1.0:
            errors.append(f"{name}.warmup_ratio: must be in [0, 1), got {st.warmup_ratio}")
        if st.weight_decay < 0:
            errors.append(f"{name}.weight_decay: must be >= 0, got {st.weight_decay}")
    s0 = cfg.stage0
    if not s0.enabled and s0.init_from is None and cfg.model.name_or_path == EMBEDDED:
        errors.append(
            "stage0.enabled: false needs stage0.init_from (a fine-tuned model folder) "
            "when the model is the embedded random-init one"
        )
    if s0.enabled and s0.init_from is not None:
        errors.append(
            "stage0.init_from: only used with stage0.enabled=false (stage 0 is then skipped "
            "and distill starts from that folder); with stage 0 enabled it would be ignored"
        )


def _check_distill(cfg: Config, errors: list[str]) -> None:
    dd = cfg.distill
    if dd.view_parallel_size != "auto":
        _positive(errors, "distill.view_parallel_size", dd.view_parallel_size)
    if dd.eval_every < 0:
        errors.append("distill.eval_every: must be >= 0")
    if dd.guard_max_en_drop < 0:
        errors.append("distill.guard_max_en_drop: must be >= 0")
    if not 0.0 <= dd.guard_min_entropy_ratio <= 1.0:
        errors.append("distill.guard_min_entropy_ratio: must be in [0, 1]")
    if not 0.0 <= dd.guard_min_agreement <= 100.0:
        errors.append("distill.guard_min_agreement: must be a percentage in [0, 100]")
    _positive(errors, "distill.guard_patience", dd.guard_patience)
    errors += _registry_problems(cfg)


def _registry_problems(cfg: Config) -> list[str]:
    """The variants the config names, against the tables that register them (imported here,
    not at the top: they bring torch and DeepSpeed, which reading a config does not need)."""
    from alsace_ds.method.pairs import DIRECTIONS, PAIR_POLICIES
    from alsace_ds.recipes.strategies import DISTILL_METHODS

    out = []
    for key, table in (("pairs", PAIR_POLICIES), ("direction", DIRECTIONS),
                       ("method", DISTILL_METHODS)):  # fmt: skip
        value = getattr(cfg.distill, key)
        if value not in table:
            out.append(f"distill.{key}: {value!r} is not one of {list(table)}")
    out += _selection_rule_problems(cfg.selection)
    return out


def _selection_rule_problems(s: SelectionConfig) -> list[str]:
    """``selection.rule`` against SELECTION_RULES, with ``selection.teachers``, and a
    ``selection.corpus_sizes`` that names no table or a file that cannot be read."""
    from alsace_ds.data.pretraining import TABLES, CorpusSizeError, read_sizes_file
    from alsace_ds.recipes.strategies import SELECTION_RULES

    out = []
    if s.rule not in SELECTION_RULES:
        out.append(f"selection.rule: {s.rule!r} is not one of {list(SELECTION_RULES)}")
    elif s.teachers is not None and s.rule not in ("threshold", "fixed"):
        out.append(
            f"selection.teachers: {s.teachers} fixes the teachers, so selection.rule "
            f"{s.rule!r} would be ignored; set one of them (selection.teachers means rule 'fixed')"
        )
    elif s.teachers is None and s.rule == "fixed":
        out.append("selection.rule: 'fixed' needs selection.teachers (a list of codes, or [all])")
    if s.corpus_sizes != "auto" and s.corpus_sizes not in TABLES:
        try:
            read_sizes_file(resolve_path(s.corpus_sizes))
        except CorpusSizeError as exc:
            out.append(str(exc))
    return out


def _check_selection(cfg: Config, errors: list[str]) -> None:
    s = cfg.selection
    if s.threshold is not None and not (0.0 < s.threshold <= 1.0):
        errors.append(f"selection.threshold: must be in (0, 1], got {s.threshold}")
    _positive(errors, "selection.batch_size", s.batch_size)
    # Against the configured languages here; task.languages empty (the embedded and Hub
    # defaults): alsace_ds.data.tasks.prepare_task checks them once they are resolved.
    if cfg.task.languages:
        errors += teacher_problems(s.teachers, cfg.task.languages, cfg.task.name)
    _positive(errors, "eval.batch_size", cfg.eval.batch_size)


def teacher_problems(teachers: list[str] | None, languages: list[str], task: str) -> list[str]:
    """``selection.teachers`` (the vote's override): null, ``[all]``, or a non-empty list of
    the task's language codes."""
    if teachers is None or teachers == ["all"]:
        return []
    langs = f"the languages of task {task!r}: {', '.join(languages)}"
    if not teachers:
        return [
            f"selection.teachers: [] names no teacher language; list some of {langs}; or "
            "write [all] for every language, or leave it null (teachers chosen by the vote)"
        ]
    if "all" in teachers:
        return [f"selection.teachers: 'all' stands alone ([all]), got {teachers}"]
    problems = []
    if len(set(teachers)) != len(teachers):
        problems.append(f"selection.teachers: duplicate codes in {teachers}")
    unknown = [x for x in teachers if x not in languages]
    if unknown:
        problems.append(
            f"selection.teachers: unknown language code(s) {', '.join(map(repr, unknown))} "
            f"(not among {langs})"
        )
    return problems


def _check_deepspeed(cfg: Config, errors: list[str]) -> None:
    d = cfg.deepspeed
    if d.zero_stage is not None and d.zero_stage not in (0, 1, 2, 3):
        errors.append(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {d.zero_stage}")
    if not resolve_path(d.config).is_file():
        errors.append(f"deepspeed.config: no such file {d.config!r}")
    if not d.gradient_clipping >= 0:
        errors.append(
            "deepspeed.gradient_clipping: must be >= 0 (0 = no clipping), "
            f"got {d.gradient_clipping}"
        )
    _positive(errors, "deepspeed.timeout_s", d.timeout_s)
    if d.param_persistence_threshold < 0:
        errors.append("deepspeed.param_persistence_threshold: must be >= 0")


def _check_run(cfg: Config, errors: list[str]) -> None:
    r = cfg.run
    if not r.output_dir.strip():
        errors.append(
            "run.output_dir: must not be empty (the run would write into the current "
            "directory); name a folder, e.g. runs/my-run"
        )
    _positive(errors, "run.log_every", r.log_every)
    if r.checkpoint_every < 0:
        errors.append("run.checkpoint_every: must be >= 0")
    if r.checkpoint_minutes is not None and r.checkpoint_minutes < 0:
        errors.append("run.checkpoint_minutes: must be >= 0")
    _positive(errors, "run.keep_checkpoints", r.keep_checkpoints)
    _positive(errors, "run.stop_after_steps", r.stop_after_steps, allow_none=True)


def auto_view_parallel(world: int, global_batch: int | None) -> int:
    """``view_parallel_size: auto``: the smallest view-group size that divides ``world`` and
    leaves a data-parallel world dividing ``global_batch`` (1 without a global batch). One
    always exists: size ``world`` leaves one group, which takes any batch."""
    if global_batch is None:
        return 1
    return next(
        v for v in range(1, world + 1) if world % v == 0 and global_batch % (world // v) == 0
    )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_batch(global_batch: int, micro_cap: int, dp: int) -> tuple[int, int] | None:
    """``(micro_batch, grad_accum)`` that give each of ``dp`` data-parallel ranks
    ``global_batch / dp`` examples per optimizer step, in micro-steps of the largest size
    <= ``micro_cap`` that divides that share; None when the share is not whole."""
    if global_batch % dp:
        return None
    share = global_batch // dp
    micro = max(d for d in _divisors(share) if d <= micro_cap)
    return micro, share // micro


def with_world(cfg: Config, world: int) -> Config:
    """Resolve the batch layout for a launch of ``world`` ranks: ``distill.view_parallel_size:
    auto`` (see :func:`auto_view_parallel`), and each stage's ``global_batch`` into
    ``micro_batch`` x ``grad_accum`` per data-parallel rank (:func:`split_batch`; the
    distillation's examples are shared by each view group, so its data-parallel ranks are
    ``world / view_parallel_size``). Raises ConfigError, naming what would work, when a global
    batch cannot be split evenly."""
    problems: list[str] = []
    new: dict[str, Any] = {}
    d = cfg.distill
    vp = d.view_parallel_size
    if vp == "auto":
        vp = auto_view_parallel(world, d.global_batch)
        new["distill"] = dataclasses.replace(d, view_parallel_size=vp)
    for name in ("stage0", "distill"):
        st = new.get(name, getattr(cfg, name))
        if st.global_batch is None or (name == "stage0" and not st.enabled):
            continue
        dp = max(world // (vp if name == "distill" else 1), 1)
        split = split_batch(st.global_batch, st.micro_batch, dp)
        if split is None:
            problems.append(_split_problem(name, st.global_batch, world, vp))
            continue
        micro, accum = split
        new[name] = dataclasses.replace(st, micro_batch=micro, grad_accum=accum, global_batch=None)
    if problems:
        raise ConfigError(problems, "batch sizes")
    return dataclasses.replace(cfg, **new)


def _split_problem(name: str, batch: int, world: int, vp: int) -> str:
    ranks = ", ".join(map(str, _divisors(batch)))
    multiple = -(-batch // world) * world  # the smallest multiple of world >= batch
    if name == "stage0":
        return (
            f"stage0.global_batch: {batch} examples per step do not split evenly over {world} "
            f"ranks; it runs on {ranks} ranks (the divisors of {batch}). On {world} ranks set "
            f"stage0.global_batch to a multiple of {world} (e.g. {multiple}), or fine-tune "
            "elsewhere and pass stage0.enabled=false stage0.init_from=<model folder>"
        )
    return (
        f"distill.global_batch: {batch} examples per step do not split evenly over "
        f"{world // vp} view groups ({world} ranks / view_parallel_size {vp}); set "
        "distill.view_parallel_size=auto (it picks a group size that does), or a global_batch "
        f"that {world // vp} divides"
    )


PRESETS_DIR = REPO_ROOT / "configs" / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a preset in ``configs/presets`` (``xnli-xlmr-large``)."""
    p = resolve_path(name_or_path)
    if p.exists() or name_or_path.endswith((".yaml", ".yml")):
        return p
    preset = PRESETS_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        [f"--config {name_or_path!r}: no such file and no such preset "
         f"(presets: {', '.join(preset_names())})"]
    )  # fmt: skip
