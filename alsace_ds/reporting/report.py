"""``report.json`` / ``report.md`` / ``table{2,3}.csv`` of a run: accuracies before and after
beside the gap (a smaller gap bought with lower accuracy is a failure, and is said so), the
parameter change of each stage and the collapse guard's checks. Pure: renders dicts and text;
the recipe writes them."""

from __future__ import annotations

from dataclasses import dataclass

from alsace_ds.data.tasks import TaskData
from alsace_ds.method.guard import collapse_warnings
from alsace_ds.method.metrics import markdown_table
from alsace_ds.reporting.tables import states_of, table2, table3, to_csv, to_markdown


def guard_markdown(guard: dict, english: str | None) -> str:
    """The distill dev checks as a table: the collapse guard's view of the run."""
    head = (
        "| step | "
        + (f"{english} dev acc | " if english else "")
        + ("min mean-pred entropy (bits) | min agreement with start | consistency | healthy |")
    )
    cols = head.count("|") - 1
    lines = ["## Collapse guard (dev checks of distill)", "", head, "|" + "---:|" * cols]
    for c in guard["checks"]:
        en = f"{c['english_accuracy']:.2f} | " if english else ""
        lines.append(
            f"| {c['step']} | {en}{min(c['mean_prediction_entropy_bits'].values()):.3f} | "
            f"{min(c['agreement_with_start'].values()):.1f} | {c['consistency']:.2f} | "
            f"{'yes' if c['healthy'] else 'NO: ' + '; '.join(c['problems'])} |"
        )
    lines += ["", f"Latest healthy check (kept): step {guard['best_step']}; final model from "
              f"{guard['final_from']}; stopped early: {guard['stopped_early']}.", ""]  # fmt: skip
    return "\n".join(lines)


def intervals_markdown(intervals: dict, n: int) -> str:
    """after - before in plain words: a change whose interval covers 0 is said to be one."""
    names = {"avg_accuracy": "average accuracy", "avg_gap": "average gap (smaller is better)"}
    lines = [f"## After - before on the same {n} test examples", ""]
    lines += [f"- {names[k]}: {v['text']}" for k, v in intervals.items()]
    acc = intervals.get("avg_accuracy")
    if acc is not None and (acc["covers_zero"] or acc["delta"] < 0):
        lines += ["", "**This run's accuracy gain cannot be told from zero, or is negative.**"]
    return "\n".join(lines) + "\n"


ENSEMBLE_NAMES = {
    "language_weighted": "language-weighted (votes weighted by shat_t)",
    "voted": "voted (equal weights)",
    "english": "English alone",
}


def ensembles_markdown(ensembles: dict, before: dict, after: dict | None, n: int) -> str:
    """Each test-time ensemble rule's accuracy before / after, and the best single language
    (of each evaluation, by its own accuracy) for reference."""
    whens = [w for w in ("before", "after") if ensembles.get(w)]
    summ = {"before": before, "after": after}
    lines = [
        "## Test-time ensembles (paper Figure 4)",
        "",
        f"One prediction per test example ({n}) from its language views; accuracy in %.",
        "",
        "| rule | " + " | ".join(f"acc {w}" for w in whens) + " |",
        "|---|" + "---:|" * len(whens),
    ]
    for rule in ensembles[whens[0]]:
        accs = " | ".join(f"{ensembles[w][rule]:.2f}" for w in whens)
        lines.append(f"| {ENSEMBLE_NAMES.get(rule, rule)} | {accs} |")
    best = []
    for w in whens:
        acc = summ[w]["accuracy"]
        lang = max(acc, key=lambda x: acc[x])
        best.append(f"{lang} {acc[lang]:.2f}")
    lines.append(f"| best single language (reference) | {' | '.join(best)} |")
    return "\n".join(lines) + "\n"


def movement_markdown(changes: dict) -> str:
    """The parameter change of each stage beside what its schedule could do at most."""
    rows = [(k, v) for k, v in changes.items() if v]
    if not rows:
        return ""
    dtype = rows[0][1]["compute_dtype"]
    lines = [
        "## How far training moved the weights (trainable ones, fp32 master)",
        "",
        f"| stage | steps | peak lr | schedule | Σ lr (max Adam move) | bound on ‖Δ‖/‖θ‖ | "
        f"‖Δ‖/‖θ‖ | weights changed | changed in {dtype} | max abs Δ |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for stage, c in rows:
        b = c.get("bound") or {}
        lines.append(
            f"| {stage} | {b.get('steps', '')} | {b.get('peak_lr', 0):.3g} | "
            f"{b.get('schedule', '')} | {b.get('bound', 0):.3g} | "
            f"{b.get('relative_bound', 0):.3g} | {c['relative_change']:.3g} | "
            f"{100 * c['changed_share']:.2f}% | {100 * c['changed_share_compute']:.2f}% | "
            f"{c['max_abs_change']:.3g} |"
        )
    notes = [f"- **WARNING** {s}: {c['bound']['cannot_change']}" for s, c in rows
             if (c.get("bound") or {}).get("cannot_change")]  # fmt: skip
    return "\n".join(lines + [""] + notes) + "\n"


@dataclass(frozen=True)
class Outcome:
    """What a recipe found: the roles, the evaluations and the stages' side records."""

    threshold: float
    teachers: list[str]
    students: list[str]
    before: dict  # summarize() of the test set before distill
    after: dict | None  # ... and after (None: distill off)
    guard: dict | None = None  # DevMonitor.summary()
    changes: dict | None = None  # stage -> parameter-change stats
    stage0_start: dict | None = None  # stage0/best.json: the stage-0 model distill started from
    intervals: dict | None = None  # after - before with paired bootstrap intervals (stats)
    ensembles: dict | None = None  # {"before"|"after": {rule: test accuracy}} (Figure 4)


GAP_DIVISORS = (
    "Δ(A) is the sum of the non-English gaps divided by their number (paper Tables 2 and 4); "
    "Δ(A)/|T| divides the same sum by all |T| languages, English's 0 counted (paper Table 3)."
)


def render(
    task: TaskData, model_name: str, method: str, out: Outcome, max_en_drop: float,
    min_entropy_ratio: float,
) -> tuple[dict, str, dict]:  # fmt: skip
    """(report.json content, report.md text, {table name: rows}). The warnings apply the
    collapse guard's rules (``distill.guard_max_en_drop`` / ``guard_min_entropy_ratio``) to
    the test set before and after."""
    en = task.english
    warnings = collapse_warnings(out.before, out.after, en, max_en_drop, min_entropy_ratio)
    states = states_of(out.before, out.after, model_name)
    tables = {"table2": table2(states, task.english), "table3": table3(states)}
    report = {
        "english": task.english,
        "languages": task.languages,
        "teachers": out.teachers,
        "students": out.students,
        "threshold": out.threshold,
        "test_file": task.test.path,
        "num_test_examples": len(task.test),
        "unlabeled_file": task.unlabeled.path,
        "num_unlabeled_examples": len(task.unlabeled),
        "head": task.head,
        "stage0_start": out.stage0_start,
        "before": out.before,
        "after": out.after,
        "warnings": warnings,
        "data_notes": task.notes,
        "method": method,
        "guard": out.guard,
        "param_change": out.changes or {},
        "intervals": out.intervals,
        "ensembles": out.ensembles,
        "tables": tables,
    }
    return report, _markdown(task, out, warnings, tables), tables


def _markdown(task: TaskData, out: Outcome, warnings: list[str], tables: dict) -> str:
    roles = {x: ("teacher" if x in out.teachers else "student") for x in task.languages}
    en = task.english
    gap_note = (
        f"gap = acc({en}) - acc(t); average gaps are over the languages other than {en}"
        if en
        else "no reference language (no English view): accuracies only"
    )
    md = (
        f"# ALSACE report\n\nTest set: `{task.test.path}` ({len(task.test)} parallel "
        f"examples x {len(task.languages)} languages). Accuracy in %, {gap_note}."
        f"\n\nTeachers: {', '.join(out.teachers)}; "
        f"students: {', '.join(out.students) or '–'} (theta = {out.threshold:.4f}).\n\n"
        f"{markdown_table(out.before, out.after, roles)}"
        f"\n## Per language (paper Table 2 layout)\n\n{to_markdown(tables['table2'])}"
        f"\n## Students / teachers / all (paper Table 3 layout)\n\n{GAP_DIVISORS}\n\n"
        f"{to_markdown(tables['table3'])}"
    )
    if out.intervals:
        md += "\n" + intervals_markdown(out.intervals, len(task.test))
    if out.ensembles:
        md += "\n" + ensembles_markdown(out.ensembles, out.before, out.after, len(task.test))
    if warnings:
        md += "\n" + "".join(f"**WARNING**: {w}\n" for w in warnings)
    if out.changes and any(out.changes.values()):
        md += "\n" + movement_markdown(out.changes)
    if out.guard is not None:
        md += "\n" + guard_markdown(out.guard, en)
    if task.notes:
        md += "\n## Data notes\n\n" + "".join(f"- {n}\n" for n in task.notes)
    return md


def csv_files(tables: dict) -> dict[str, str]:
    return {f"{name}.csv": to_csv(rows) for name, rows in tables.items()}
