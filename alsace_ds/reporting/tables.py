"""Paper-style result tables from the before/after summaries (pure: dicts in, rows out).

- Table 2 layout (per language): columns = the languages then ``avg``; for each model state
  an accuracy row and a Δ row (gap to English; ``\\`` under English, the average gap over the
  non-English languages under ``avg``, with its change in parentheses on the "after" row).
- Table 3 layout (per group): ``avg(S) Δ(S) avg(T) Δ(T) avg(A) Δ(A) Δ(A)/|T|`` for students,
  teachers, all, one row per model state. Δ(A) divides the sum of the non-English gaps by
  their number (paper Tables 2 and 4: ÷14 on XNLI); the paper's Table 3 divides the same sum
  by all |T| languages (÷15, English's 0 counted): the last column.

Each table is written as Markdown, CSV and JSON rows (the same cells).
"""

from __future__ import annotations

import csv
import io

GROUPS = (("S", "students"), ("T", "teachers"), ("A", "all"))


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _change(new: float | None, old: float | None) -> str:
    if new is None or old is None:
        return ""
    return f" ({new - old:+.2f})"


def table2(states: list[tuple[str, dict]], english: str | None) -> list[list[str]]:
    """Rows of the per-language table; ``states`` = [(name, summary), ...] (e.g. before,
    after). The first row is the header."""
    langs = list(states[0][1]["accuracy"])
    rows = [["model", *langs, "avg"]]
    base = states[0][1]
    for name, summ in states:
        avg = summ["averages"]["all"]
        rows.append([name, *(_num(summ["accuracy"][x]) for x in langs), _num(avg["accuracy"])])
        if english is None:
            continue
        gaps = ["\\" if x == english else _num(summ["gap"][x]) for x in langs]
        delta = "" if summ is base else _change(avg["gap"], base["averages"]["all"]["gap"])
        rows.append([f"Δ {name}", *gaps, _num(avg["gap"]) + delta])
    return rows


def table3(states: list[tuple[str, dict]]) -> list[list[str]]:
    """Rows of the group table (students S, teachers T, all A); first row is the header."""
    head = ["method"]
    for short, _ in GROUPS:
        head += [f"avg({short})", f"Δ({short})"]
    rows = [head + ["Δ(A)/|T|"]]
    for name, summ in states:
        row = [name]
        for _, group in GROUPS:
            avg = summ["averages"][group]
            row += [_num(avg["accuracy"]), _num(avg["gap"])]
        gap, T = summ["averages"]["all"]["gap"], len(summ["accuracy"])
        rows.append(row + [_num(None if gap is None else gap * (T - 1) / T)])
    return rows


def to_markdown(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def states_of(before: dict, after: dict | None, model: str = "baseline") -> list[tuple[str, dict]]:
    return [(model, before)] + ([("ALSACE", after)] if after is not None else [])
