"""Recompute the experiment driver's Table 3 / Table 4 / options CSV files from the saved
predictions alone, independently of alsace_ds (numpy + safetensors + json only), and compare.

    python tests/recompute_tables.py EXPERIMENT_DIR     # exit 0: every cell agrees

Definitions, written out again on purpose (not imported): per seed, the groups are the
stage-0 run's selection (teachers_used / students_used); avg over a group = mean of the
per-language accuracies (% of test examples whose argmax equals the label); gap_t =
acc(en) - acc(t); gap_S over students, gap_T over non-English teachers, gap_A over all
non-English languages (÷ their number), gap_A_15 = the same sum ÷ all languages. A cell is
the mean over seeds.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

TABLE_FILES = ("table3.csv", "table4.csv", "table_options.csv")


def accuracies(path: Path) -> dict[str, float]:
    data = load_file(str(path))
    with safe_open(str(path), framework="np") as fh:
        langs = json.loads(fh.metadata()["languages"])
    right = data["probs"].argmax(-1) == data["labels"][:, None]  # [N, T]
    return {lang: 100.0 * float(right[:, i].mean()) for i, lang in enumerate(langs)}


def cells(acc: dict[str, float], teachers: list[str], students: list[str]) -> dict:
    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    gap = {x: acc["en"] - acc[x] for x in acc if x != "en"}
    return {
        "avg_S": mean([acc[x] for x in students]),
        "gap_S": mean([gap[x] for x in students if x != "en"]),
        "avg_T": mean([acc[x] for x in teachers]),
        "gap_T": mean([gap[x] for x in teachers if x != "en"]),
        "avg_A": mean(list(acc.values())),
        "gap_A": mean(list(gap.values())),
        "gap_A_15": sum(gap.values()) / len(acc),
    }


def recompute(exp: Path, run: str) -> dict:
    per_seed = []
    for seed_dir in sorted(exp.glob("seed*")):
        sel = json.loads((seed_dir / "stage0" / "selection.json").read_text())
        if run == "stage0":
            path = seed_dir / "stage0" / "predictions" / "test_before.safetensors"
        else:
            path = seed_dir / run / "predictions" / "test_after.safetensors"
        per_seed.append(cells(accuracies(path), sel["teachers_used"], sel["students_used"]))
    out = {}
    for key in per_seed[0]:
        values = [c[key] for c in per_seed if c[key] is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


def compare(exp: Path, tol: float = 1e-3) -> list[str]:
    problems, seen = [], 0
    for name in TABLE_FILES:
        path = exp / name
        if not path.is_file():
            continue
        for row in csv.DictReader(path.open()):
            mine = recompute(exp, row["run"])
            for key, value in mine.items():
                seen += 1
                theirs = row[key]
                if value is None or theirs == "":
                    if (value is None) != (theirs == ""):
                        problems.append(f"{name} {row['run']} {key}: {theirs!r} vs {value}")
                elif abs(float(theirs) - value) > tol:
                    problems.append(
                        f"{name} {row['run']} {key}: {theirs} vs recomputed {value:.4f}"
                    )
    if seen == 0:
        problems.append(f"{exp}: no table cell found")
    return problems


if __name__ == "__main__":
    found = compare(Path(sys.argv[1]))
    print("\n".join(found) or "every table cell agrees with the saved predictions")
    sys.exit(1 if found else 0)
