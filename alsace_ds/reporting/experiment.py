"""The experiment driver's tables, from saved predictions only (no model): paper Tables 3
and 4 over every run of every seed, the deltas with their confidence intervals, and the
test-time ensembles (paper Figure 4).

Inputs are the files each run keeps (``alsace_ds.recipes.evaluation.save_predictions``):
``predictions/test_{before,after}.safetensors`` (``probs`` ``[N, T, C]``, ``labels`` ``[N]``,
metadata ``languages``) and ``selection.json``. Per seed, the stage-0 run gives the model
before distillation (its ``test_before``), the language groups (its selection's teachers
and students: ALSACE's, which every row of the paper's tables is grouped by) and the
language weights shat_t of the ensembles.

Group columns (paper Tables 3-4): avg(S) / avg(T) / avg(A) are mean accuracies over the
students, the teachers (English included) and all languages; Delta(S) / Delta(T) the mean gap
acc(en) - acc(t) over the students and the non-English teachers; Delta(A) divides the sum of
the non-English gaps by their number (14 on XNLI: paper Tables 2 and 4). Paper Table 3 divides
the same sum by 15 (English's 0 counted): that column is ``gap_A_15``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from alsace_ds.method.ensemble import ENSEMBLE_RULES, ensemble_accuracies
from alsace_ds.method.stats import Interval, avg_accuracy, avg_gap, paired_bootstrap, seed_bootstrap

GROUP_COLUMNS = ("avg_S", "gap_S", "avg_T", "gap_T", "avg_A", "gap_A", "gap_A_15")
STAGE0 = "stage0"  # the row of the model before distillation


@dataclass(frozen=True)
class Predictions:
    probs: Tensor  # [N, T, C] float
    labels: Tensor  # [N] long
    languages: list[str]

    @cached_property  # read once per table, delta and reference: argmax over [N, T, C] once
    def correct(self) -> Tensor:
        """``[N, T]`` bool: example n right in language t."""
        return self.probs.argmax(-1) == self.labels[:, None]


def load_predictions(path: Path) -> Predictions:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no saved predictions (did the run finish?)")
    saved = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    return Predictions(
        saved["probs"].float(), saved["labels"].long(), json.loads(meta["languages"])
    )


@dataclass(frozen=True)
class SeedRuns:
    """One seed: the stage-0 model's test predictions, its selection, and each variant's
    test predictions after distillation (all on the same N test examples)."""

    seed: int
    languages: list[str]
    english: str | None
    teachers: list[str]
    students: list[str]
    scores: list[float]  # shat_t per language (the stage-0 model's selection)
    before: Predictions
    after: dict[str, Predictions]  # variant -> predictions


def load_seed(seed: int, seed_dir: Path, variants: Sequence[str], english: str | None) -> SeedRuns:
    """A seed's runs; refuses variants whose test set or model-before differ from stage 0's
    (the deltas are paired: the same examples, the same start)."""
    stage0 = seed_dir / STAGE0
    sel = json.loads((stage0 / "selection.json").read_text())
    before = load_predictions(stage0 / "predictions" / "test_before.safetensors")
    after = {}
    for name in variants:
        run = seed_dir / name
        mine = load_predictions(run / "predictions" / "test_before.safetensors")
        if not torch.equal(mine.labels, before.labels) or mine.languages != before.languages:
            raise ValueError(
                f"{run}: its test set differs from {stage0}'s; the runs are not paired"
            )
        if not torch.equal(mine.probs.argmax(-1), before.probs.argmax(-1)):
            raise ValueError(f"{run}: its start model predicts differently from {stage0}'s model")
        after[name] = load_predictions(run / "predictions" / "test_after.safetensors")
    return SeedRuns(
        seed, before.languages, english, sel["teachers_used"], sel["students_used"],
        [float(sel["languages"][x]["shat_t"]) for x in before.languages], before, after,
    )  # fmt: skip


# ----------------------------------------------------------------------------- group tables


def group_row(
    correct: Tensor, languages: list[str], english: str | None, teachers: list[str],
    students: list[str],
) -> dict[str, float | None]:  # fmt: skip
    """The paper's group columns of one run (``correct`` ``[N, T]``); None for an empty group."""
    acc = dict(zip(languages, (100.0 * correct.double().mean(0)).tolist(), strict=True))

    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    row = {
        "avg_S": mean([acc[x] for x in students]),
        "avg_T": mean([acc[x] for x in teachers]),
        "avg_A": mean(list(acc.values())),
    }
    if english is None:
        return {**row, "gap_S": None, "gap_T": None, "gap_A": None, "gap_A_15": None}
    gap = {x: acc[english] - acc[x] for x in languages if x != english}
    row["gap_S"] = mean([gap[x] for x in students if x != english])
    row["gap_T"] = mean([gap[x] for x in teachers if x != english])
    row["gap_A"] = mean(list(gap.values()))
    row["gap_A_15"] = sum(gap.values()) / len(languages)
    return row


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    kept = [v for v in values if v is not None]
    if not kept:
        return None, None
    m = sum(kept) / len(kept)
    sd = (sum((v - m) ** 2 for v in kept) / (len(kept) - 1)) ** 0.5 if len(kept) > 1 else 0.0
    return m, sd


def table(seeds: Sequence[SeedRuns], rows: Sequence[tuple[str, str]]) -> list[dict]:
    """One paper-layout table: ``rows`` = (run name or :data:`STAGE0`, title); each cell the
    mean over seeds (and ``<col>_sd`` the sample standard deviation)."""
    out = []
    for name, title in rows:
        per_seed = []
        for s in seeds:
            pred = s.before if name == STAGE0 else s.after[name]
            per_seed.append(group_row(pred.correct, s.languages, s.english, s.teachers, s.students))
        row: dict = {"run": name, "title": title, "seeds": len(seeds)}
        for col in GROUP_COLUMNS:
            row[col], row[f"{col}_sd"] = _mean_sd([r[col] for r in per_seed])
        out.append(row)
    return out


# ----------------------------------------------------------------------------- deltas


def _statistics(s: SeedRuns) -> dict:
    langs = s.languages
    out = {"avg_accuracy": avg_accuracy(range(len(langs)))}
    if s.english is not None:
        e = langs.index(s.english)
        out["avg_gap"] = avg_gap(e, [t for t in range(len(langs)) if t != e])
    return out


def _interval_json(iv: Interval, unit: str) -> dict:
    return {**asdict(iv), "covers_zero": iv.covers_zero, "text": iv.describe(unit)}


def deltas(
    seeds: Sequence[SeedRuns], variants: Sequence[str], reference: str | None, draws: int = 2000
) -> list[dict]:
    """Each variant's average accuracy and average gap minus the reference's (``STAGE0`` =
    the model before distillation, or a run name), per seed (paired bootstrap over test
    examples) and over seeds (seeds and examples resampled together)."""
    out = []
    for name in variants:
        if name == reference:
            continue
        row: dict = {"run": name, "reference": reference, "per_seed": {}, "seeds": len(seeds)}
        for key, unit in (("avg_accuracy", " points of accuracy"), ("avg_gap", " points")):
            pairs = []
            for s in seeds:
                stats = _statistics(s)
                if key not in stats:
                    break
                ref = s.before if reference == STAGE0 else s.after[reference]
                pairs.append((ref.correct, s.after[name].correct))
                iv = paired_bootstrap(*pairs[-1], stats[key], draws=draws, seed=s.seed)
                row["per_seed"].setdefault(str(s.seed), {})[key] = _interval_json(iv, unit)
            if len(pairs) == len(seeds) and pairs:
                iv = seed_bootstrap(pairs, _statistics(seeds[0])[key], draws=draws, seed=0)
                row[key] = _interval_json(iv, unit)
        out.append(row)
    return out


def verdict(name: str, reference: str, key: str, iv: dict) -> str:
    """One plain-words line: better, worse, or not told apart (gap: lower is better)."""
    what = "average accuracy" if key == "avg_accuracy" else "average gap"
    seeds = f"{iv['seeds']} seed{'s' * (iv['seeds'] > 1)}"
    numbers = f"{iv['delta']:+.2f} [{iv['lo']:+.2f}, {iv['hi']:+.2f}] points, {seeds}"
    if iv["covers_zero"]:
        return f"{name} vs {reference}: {what} {numbers}: cannot be told apart"
    good = (iv["delta"] > 0) == (key == "avg_accuracy")
    return f"{name} vs {reference}: {what} {numbers}: {'better' if good else 'WORSE'}"


# ----------------------------------------------------------------------------- ensembles


def ensembles(seeds: Sequence[SeedRuns], after_run: str | None) -> dict:
    """Accuracy (%) of each ensemble rule's one prediction per example, before distillation
    and after ``after_run`` (weights: the stage-0 selection's shat_t), mean over seeds, with
    the average single language and the best single language beside them."""
    out: dict = {}
    whens = [("before", None)] + ([("after", after_run)] if after_run else [])
    for when, run in whens:
        per_rule: dict[str, list[float]] = {r: [] for r in (*ENSEMBLE_RULES, "avg", "best")}
        for s in seeds:
            pred = s.before if run is None else s.after[run]
            en = s.languages.index(s.english) if s.english in s.languages else None
            weights = torch.tensor(s.scores, dtype=torch.float64)  # [T] shat_t
            for rule, acc in ensemble_accuracies(pred.probs, pred.labels, weights, en).items():
                per_rule[rule].append(acc)
            acc = 100.0 * pred.correct.double().mean(0)  # [T]
            per_rule["avg"].append(float(acc.mean()))
            per_rule["best"].append(float(acc.max()))
        out[when] = {r: _mean_sd(v)[0] for r, v in per_rule.items() if v}
    return out


# ----------------------------------------------------------------------------- text


def _cell(row: dict, col: str) -> str:
    value, sd = row[col], row.get(f"{col}_sd")
    if value is None:
        return "–"
    return f"{value:.2f}" + (f" ± {sd:.2f}" if row["seeds"] > 1 and sd is not None else "")


def table_markdown(rows: list[dict]) -> str:
    head = ("| method | avg(S) ↑ | Δ(S) ↓ | avg(T) ↑ | Δ(T) ↓ | avg(A) ↑ | Δ(A) ↓ (÷14) | "
            "Δ(A) (÷15) |")  # fmt: skip
    lines = [head, "|---" + "|---:" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['title']} | " + " | ".join(_cell(r, c) for c in GROUP_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict]) -> str:
    cols = ["run", "title", "seeds", *GROUP_COLUMNS, *(f"{c}_sd" for c in GROUP_COLUMNS)]
    lines = [",".join(cols)]
    for r in rows:
        cells = [r[c] for c in cols]
        lines.append(",".join("" if v is None else (f"{v:.4f}" if isinstance(v, float) else
                                                     str(v)) for v in cells))  # fmt: skip
    return "\n".join(lines) + "\n"


def deltas_markdown(rows: list[dict], titles: dict[str, str]) -> str:
    lines = ["| method | vs | Δ avg accuracy [95% CI] | Δ avg gap [95% CI] | seeds |",
             "|---|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        cells = []
        for key in ("avg_accuracy", "avg_gap"):
            iv = r.get(key)
            if iv is None:
                cells.append("–")
                continue
            mark = "" if iv["covers_zero"] else "**"
            cells.append(f"{mark}{iv['delta']:+.2f} [{iv['lo']:+.2f}, {iv['hi']:+.2f}]{mark}")
        ref = titles.get(r["reference"], r["reference"])
        lines.append(f"| {titles.get(r['run'], r['run'])} | {ref} | {cells[0]} | {cells[1]} | "
                     f"{r['seeds']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def ensembles_markdown(ens: dict) -> str:
    names = {"language_weighted": "language-weighted (shat_t)", "voted": "voted (equal weights)",
             "english": "English only", "avg": "average single language",
             "best": "best single language"}  # fmt: skip
    whens = list(ens)
    lines = ["| ensemble | " + " | ".join(whens) + " |", "|---" + "|---:" * len(whens) + "|"]
    for rule, label in names.items():
        if all(rule in ens[w] for w in whens):
            lines.append(f"| {label} | " + " | ".join(f"{ens[w][rule]:.2f}" for w in whens) + " |")
    return "\n".join(lines) + "\n"
