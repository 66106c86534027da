"""The variants a recipe takes, each registered by name in one table:

- :data:`SELECTION_RULES` (``selection.rule``; ``teachers, students`` from the vote's
  :class:`Selection`): the paper's threshold on shat_t, a fixed set (``selection.teachers``,
  e.g. the paper's no-selection ablation ``[all]``), and Table 3's ``random`` and ``scale``
  ablations (as many teachers as the vote picks: a seeded sample, or the languages with the
  most pre-training data, :mod:`alsace_ds.data.pretraining`);
- :data:`DISTILL_METHODS` (``distill.method``): what one distill micro-step trains on. ALSACE's
  pair KL over (any language, teacher) views of the same example, or the paper's Table 4
  English self-training baseline. The pair policy and direction of the KL are options of
  :func:`alsace_ds.method.pairs.pair_kl_loss`.

A new variant is one function here and one entry in its table."""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from alsace_ds import parallel
from alsace_ds.config import Config, SelectionConfig
from alsace_ds.data.pretraining import UNITS, load_sizes
from alsace_ds.engine.trainer import (
    StepPlan,
    cross_entropy_step,
    forward_tokens,
    predict_probs,
    to_device,
)
from alsace_ds.io import atomic_write_json
from alsace_ds.method.pairs import pair_kl_loss
from alsace_ds.method.selection import Selection, most_confident
from alsace_ds.recipes.run import Run

Roles = tuple[list[str], list[str]]  # (teachers, students), each in the task's language order
Step = Callable[[list[int]], torch.Tensor]

# ----------------------------------------------------------------------------- selection rules


@dataclass(frozen=True)
class RuleInputs:
    """What a selection rule reads besides the vote (every field identical on every rank)."""

    cfg: SelectionConfig
    seed: int = 0  # run.seed (rule "random")
    sizes: Mapping[str, float] | None = None  # rule "scale": {language: pre-training size}
    table: str | None = None  # where ``sizes`` come from (a table name or a JSON file)


Rule = Callable[[Selection, list[str], RuleInputs], Roles]


def _split(languages: list[str], chosen: Collection[str]) -> Roles:
    return [x for x in languages if x in chosen], [x for x in languages if x not in chosen]


def threshold_roles(sel: Selection, languages: list[str], inputs: RuleInputs) -> Roles:
    """The paper's rule: teachers are the languages with shat_t >= theta."""
    if not sel.teachers:
        best = max(float(x) for x in sel.scores)
        raise RuntimeError(
            f"selection: no language reached selection.threshold={sel.threshold:g} "
            f"(highest shat_t = {best:.4f}); lower the threshold or leave it null (= 1/|T|)"
        )
    return sel.teachers, sel.students


def fixed_roles(sel: Selection, languages: list[str], inputs: RuleInputs) -> Roles:
    """``selection.teachers`` overrides the vote (``[all]``: every language a teacher)."""
    teachers = inputs.cfg.teachers
    return _split(languages, languages if teachers == ["all"] else teachers or [])


def random_roles(sel: Selection, languages: list[str], inputs: RuleInputs) -> Roles:
    """Table 3's random selection: as many teachers as the vote picks (k), drawn by
    ``random.Random(run.seed).sample(languages, k)``: the same on every rank and every rerun."""
    k = len(threshold_roles(sel, languages, inputs)[0])
    return _split(languages, random.Random(inputs.seed).sample(languages, k))


def scale_roles(sel: Selection, languages: list[str], inputs: RuleInputs) -> Roles:
    """Table 3's scale-based selection: the k languages (k = the vote's count) with the most
    pre-training data in ``inputs.sizes``; equal sizes go to the earlier task language."""
    k = len(threshold_roles(sel, languages, inputs)[0])
    sizes = inputs.sizes or {}
    missing = [x for x in languages if x not in sizes]
    if missing:  # checked before training (alsace_ds.data.tasks.check_before_training)
        raise RuntimeError(
            f"selection.corpus_sizes: the table {inputs.table!r} has no size for "
            f"{', '.join(missing)}"
        )
    order = sorted(range(len(languages)), key=lambda i: (-sizes[languages[i]], i))
    return _split(languages, [languages[i] for i in order[:k]])


SELECTION_RULES: dict[str, Rule] = {
    "threshold": threshold_roles,
    "fixed": fixed_roles,
    "random": random_roles,
    "scale": scale_roles,
}


def selection_rule(cfg: SelectionConfig) -> str:
    """``selection.rule``; ``selection.teachers`` set means ``fixed``."""
    return "fixed" if cfg.teachers is not None else cfg.rule


def rule_inputs(cfg: Config, rule: str) -> RuleInputs:
    """The seed, and for ``scale`` the task languages' pre-training sizes."""
    if rule != "scale":
        return RuleInputs(cfg.selection, cfg.run.seed)
    table, sizes = load_sizes(cfg.selection.corpus_sizes, cfg.model.family, cfg.task.name)
    return RuleInputs(cfg.selection, cfg.run.seed, sizes, table)


def apply_selection_rule(
    sel: Selection, languages: list[str], cfg: Config
) -> tuple[list[str], list[str], dict[str, Any]]:
    """``(teachers, students, record)`` of the configured rule; ``record`` goes into
    ``selection.json``: the rule, and its seed (random) or the sizes it ranked (scale)."""
    rule = selection_rule(cfg.selection)
    inputs = rule_inputs(cfg, rule)
    teachers, students = SELECTION_RULES[rule](sel, languages, inputs)
    record: dict[str, Any] = {"rule": rule}
    if rule == "random":
        record["seed"] = inputs.seed
    if rule == "scale":
        record["corpus_sizes"] = {
            "table": inputs.table,
            "unit": UNITS.get(str(inputs.table), "as in the file"),
            "sizes": {x: inputs.sizes[x] for x in languages} if inputs.sizes else {},
        }
    return teachers, students, record


# ----------------------------------------------------------------------------- distill methods


@dataclass(frozen=True)
class DistillMethod:
    title: str  # for log lines
    # (run, engine, tokenizer, teachers, plan) -> (micro-step, examples drawn from, plan)
    build: Callable[[Run, Any, Any, list[str], StepPlan], tuple[Step, int, StepPlan]]


def local_languages(languages: list[str], ctx: parallel.ParallelContext) -> list[str]:
    """The language slots this rank runs: ``ceil(T / V)`` per member of the view group, the
    slots past T padded with a copy of the first language (same forward count on every rank;
    the padded outputs are cut off after the gather, so they get no loss and no gradient)."""
    per = -(-len(languages) // ctx.view_size)
    slots = range(ctx.view_rank * per, (ctx.view_rank + 1) * per)
    return [languages[j] if j < len(languages) else languages[0] for j in slots]


def self_distillation(
    run: Run, engine: Any, tok: Any, teachers: list[str], plan: StepPlan
) -> tuple[Step, int, StepPlan]:
    """ALSACE: one micro-step is ONE forward over this rank's B x T_local views, the view
    group's distributions gathered (differentiably) to ``[B, T, C]``, KL over every (any,
    teacher) pair. Every member computes the same group loss; the gather's backward sums the
    members' gradients into each view's owner, and DeepSpeed's average over all ranks then
    equals the mean over view groups (= the one-rank result when there is one group)."""
    cfg, task, ctx = run.cfg, run.task, run.ctx
    d, langs = cfg.distill, task.languages
    mine = local_languages(langs, ctx)
    toks = run.tokens.unlabeled
    rows = None  # [B * T_local] label-word rows: the same every step, on the device once
    if task.label_words is not None:
        per = torch.tensor([task.lang_id(lang) for lang in mine], dtype=torch.long)
        rows = to_device(per.repeat(d.micro_batch), ctx.device)

    def step(batch: list[int]) -> torch.Tensor:
        views = toks.indices(batch, mine)  # [B * T_local] example-major
        logits = forward_tokens(engine, toks.views, views, ctx.device, rows)
        local = torch.log_softmax(logits.float(), dim=-1).view(len(batch), len(mine), -1)
        log_probs = parallel.gather_views(local, ctx)[:, : len(langs)]  # [B, T, C]
        loss = pair_kl_loss(
            log_probs, langs, teachers,
            pairs=d.pairs, direction=d.direction, detach_teacher=d.detach_teacher,
            students_teach=d.students_teach,
        )  # fmt: skip
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return step, len(task.unlabeled), plan


#: One self-training view: (example index in the unlabeled corpus, language code).
ViewKey = tuple[int, str]


def confident_views(
    run: Run, engine: Any, tok: Any, keys: list[ViewKey]
) -> tuple[list[ViewKey], torch.Tensor]:
    """Self-training's pseudo-labels (paper Table 4): the start model's label distribution
    of every view in ``keys`` (dealt across ranks, assembled to ``[V, C]`` on every rank),
    and the most confident half of them over all ``keys`` together (ties: the earlier key).
    Returns (kept keys in ``keys`` order ``[K]``, their pseudo-labels ``[K]`` long)."""
    cfg, ctx = run.cfg, run.ctx
    toks = run.tokens.unlabeled
    views = toks.views.select([toks.index(i, lang) for i, lang in keys])  # [V] in keys order
    idx, probs = predict_probs(
        engine, views, ctx, cfg.selection.batch_size, "self-training: pseudo-labels",
        cfg.log.progress, key_rows(run, keys),
    )  # fmt: skip
    dense = parallel.assemble_rows(idx, probs, len(keys), ctx, torch.float64)  # [V, C]
    keep, labels = most_confident(dense, 0.5)  # [K], [K]
    return [keys[i] for i in keep.tolist()], labels


def key_rows(run: Run, keys: list[ViewKey]) -> torch.Tensor | None:
    """``[len(keys)]`` label-word table row of each key's language (host); None for the
    classification head."""
    if run.task.label_words is None:
        return None
    return torch.tensor([run.task.lang_id(lang) for _, lang in keys], dtype=torch.long)


def kept_per_language(kept: list[ViewKey], languages: list[str]) -> dict[str, int]:
    """How many pseudo-labelled views of each language were kept: ``languages`` in order (0
    for none), then any other language of ``kept`` (English self-training's training
    language when it is not a task language)."""
    counts = dict.fromkeys(languages, 0)
    for _, lang in kept:
        counts[lang] = counts.get(lang, 0) + 1
    return counts


def self_training(
    run: Run, engine: Any, tok: Any, keys: list[ViewKey], plan: StepPlan
) -> tuple[Step, int, StepPlan, list[ViewKey]]:
    """Cross-entropy on the most confident half of ``keys``' pseudo-labels, with the same
    optimizer steps (compute, lr schedule) as ALSACE: an epoch is one pass over the kept
    views (``distill.micro_batch`` views per rank per micro-step). Also returns the kept keys.
    The pseudo-labels' per-language counts are written to ``self_training.json``."""
    task, cfg, ctx = run.task, run.cfg, run.ctx
    kept, labels = confident_views(run, engine, tok, keys)
    toks = run.tokens.unlabeled
    kept_views = torch.tensor([toks.index(i, lang) for i, lang in kept], dtype=torch.long)
    kept_rows = key_rows(run, kept)  # [K] or None
    if ctx.is_main:
        counts = kept_per_language(kept, task.languages)
        record = {"views": len(keys), "kept": len(kept), "kept_per_language": counts}
        atomic_write_json(run.run_dir / "self_training.json", record)

    def step(batch: list[int]) -> torch.Tensor:
        rows = None if kept_rows is None else to_device(kept_rows[batch], ctx.device)
        return cross_entropy_step(engine, toks.views, kept_views[batch], labels[batch],
                                  ctx.device, rows)  # fmt: skip

    d = cfg.distill
    per_epoch = d.grad_accum * -(-len(kept) // (d.micro_batch * ctx.dp_world * d.grad_accum))
    return step, len(kept), StepPlan(per_epoch, plan.total_micro, plan.grad_accum), kept


def english_self_training(
    run: Run, engine: Any, tok: Any, teachers: list[str], plan: StepPlan
) -> tuple[Step, int, StepPlan]:
    """Paper Table 4's English self-training: pseudo-label the unlabeled English views with
    the fine-tuned model, keep the most confident half, cross-entropy on those; the same
    optimizer steps (compute, lr schedule) as ALSACE, over the kept half."""
    english = run.task.english or run.task.train_language
    if english not in run.task.languages:
        raise ValueError(
            f"English self-training needs the unlabeled corpus's {english!r} views, and "
            f"{english!r} is not one of task.languages {run.task.languages}"
        )
    keys = [(i, english) for i in range(len(run.task.unlabeled))]
    step, n, plan, _ = self_training(run, engine, tok, keys, plan)
    run.say(f"self-training: kept the {n} most confident of {len(keys)} English pseudo-labels")
    return step, n, plan


def full_self_training(
    run: Run, engine: Any, tok: Any, teachers: list[str], plan: StepPlan
) -> tuple[Step, int, StepPlan]:
    """Paper Table 4's full-language self-training (our exact definition): pseudo-label
    EVERY language's view of every unlabeled example (N x T views) with the start model,
    keep the 50% most confident views over all languages together (not per language),
    cross-entropy on those; the same optimizer steps as ALSACE. The teachers are not used."""
    langs = run.task.languages
    keys = [(i, lang) for i in range(len(run.task.unlabeled)) for lang in langs]
    step, n, plan, kept = self_training(run, engine, tok, keys, plan)
    counts = kept_per_language(kept, langs)
    per = ", ".join(f"{lang} {c}" for lang, c in counts.items())
    run.say(f"self-training: kept the {n} most confident of {len(keys)} pseudo-labels "
            f"over all languages ({per})")  # fmt: skip
    return step, n, plan


DISTILL_METHODS: dict[str, DistillMethod] = {
    "alsace": DistillMethod("self-distillation", self_distillation),
    "english_self_training": DistillMethod("English self-training", english_self_training),
    "full_self_training": DistillMethod("full-language self-training", full_self_training),
}
