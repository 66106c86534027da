"""Figures of a run, as PNG files: per-language accuracy and gap before/after distillation,
the teacher selection, the collapse guard's dev curves, and a forest plot of deltas for the
experiment driver. Pure reporting: each ``*_figure`` function takes plain data (what
``report.json`` / ``selection.json`` / the guard summary hold) and returns a matplotlib
``Figure``; each ``*_plot`` function renders one to a PNG written atomically and returns its
path (None where the data for it is missing). Matplotlib's Agg canvas is used directly: no
pyplot, no global backend switch, no display."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from alsace_ds.io import atomic_write_bytes

BEFORE, AFTER = "#9db4cf", "#1f5a99"  # light / dark blue bars
TEACHER, STUDENT = "#b8570b", "#333333"  # tick-label colours of the roles
SIGNIFICANT, COVERS_ZERO = "#1f5a99", "#9a9a9a"  # forest plot rows
THRESHOLD = "#c0392b"  # every guard / selection threshold line
DPI = 120
LABEL_BOX = {"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85}


# ----------------------------------------------------------------------------- output


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` with the Agg canvas into memory, then write it atomically."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return atomic_write_bytes(path, buf.getvalue())


def figures_markdown(paths: dict[str, Path], run_dir: str | Path) -> str:
    """report.md's "Figures" section: one relative image link per written plot ("" if none)."""
    if not paths:
        return ""
    links = [f"![{name}]({Path(p).relative_to(run_dir).as_posix()})" for name, p in paths.items()]
    return "\n## Figures\n\n" + "\n\n".join(links) + "\n"


# ----------------------------------------------------------------------------- helpers


def _role_ticks(ax, languages: Sequence[str], teachers: Sequence[str]) -> None:
    """Language tick labels coloured (and teachers in bold) by role."""
    ax.set_xticks(range(len(languages)), labels=list(languages))
    for tick, lang in zip(ax.get_xticklabels(), languages, strict=True):
        teacher = lang in teachers
        tick.set_color(TEACHER if teacher else STUDENT)
        tick.set_fontweight("bold" if teacher else "normal")


def _role_handles() -> list[Patch]:
    return [
        Patch(facecolor="none", edgecolor="none", label="teacher (bold label)"),
        Patch(facecolor="none", edgecolor="none", label="student (plain label)"),
    ]


def _bar_pairs(ax, languages, before: dict, after: dict | None) -> None:
    """Side-by-side bars per language: before (light) and, when given, after (dark), with
    each bar's value written above it."""
    width = 0.4 if after is not None else 0.6
    series = [("before distill", BEFORE, before)]
    if after is not None:
        series.append(("after distill", AFTER, after))
    for k, (label, colour, values) in enumerate(series):
        shift = (k - (len(series) - 1) / 2) * width
        xs = [i + shift for i in range(len(languages))]
        bars = ax.bar(xs, [values[x] for x in languages], width, color=colour, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1, bbox=LABEL_BOX)


def _legend_with_roles(ax) -> None:
    """The series and the role key, outside the axes on the right (never over a bar)."""
    handles, _ = ax.get_legend_handles_labels()
    legend = ax.legend(handles=handles + _role_handles(), loc="upper left",
                       bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)  # fmt: skip
    for text in legend.get_texts()[-2:]:
        is_teacher = text.get_text().startswith("teacher")
        text.set_color(TEACHER if is_teacher else STUDENT)
        text.set_fontweight("bold" if is_teacher else "normal")


# ----------------------------------------------------------------------------- 1. accuracy


def _language_bars(
    languages: list[str], key: str, before: dict, after: dict | None, teachers: Sequence[str]
) -> tuple[Figure, Axes]:
    """A figure of before / after bars of ``summary[key]`` per language, teachers marked."""
    fig = Figure(figsize=(max(7.5, 0.9 * len(languages) + 4.0), 4.2), layout="constrained")
    ax = fig.add_subplot()
    _bar_pairs(ax, languages, before[key], after[key] if after else None)
    _role_ticks(ax, languages, teachers)
    return fig, ax


def _finish_bars(ax, ylabel: str, title: str) -> None:
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    _legend_with_roles(ax)  # after every labelled line


def accuracy_figure(
    before: dict, after: dict | None, teachers: Sequence[str], english: str | None
) -> Figure:
    """Per-language test accuracy (%) before / after distillation (``summarize()`` dicts:
    ``accuracy`` {lang: %}; ``after`` None = no distillation), the English accuracy as a
    horizontal line, teachers' tick labels in bold orange."""
    fig, ax = _language_bars(list(before["accuracy"]), "accuracy", before, after, teachers)
    if english is not None:
        for name, summ, colour in (("before", before, BEFORE), ("after", after, AFTER)):
            if summ is not None:
                en = summ["accuracy"][english]
                ax.axhline(en, color=colour, ls="--", lw=1.2, label=f"{english} {name}: {en:.1f}")
    top = max(max(s["accuracy"].values()) for s in (before, after) if s is not None)
    ax.set_ylim(0, min(top + 10.0, 110.0))  # room for the values above the bars
    title = "Accuracy per language" + (" before / after distillation" if after else "")
    _finish_bars(ax, "test accuracy (%)", title)
    return fig


def accuracy_plot(
    before: dict, after: dict | None, teachers: Sequence[str], english: str | None,
    path: str | Path,
) -> Path:  # fmt: skip
    return save_png(accuracy_figure(before, after, teachers, english), path)


# ----------------------------------------------------------------------------- 2. gap


def gap_figure(
    before: dict, after: dict | None, teachers: Sequence[str], english: str | None
) -> Figure | None:
    """The gap acc(English) - acc(t) (points) per language other than English, before /
    after; None without a reference language."""
    if english is None:
        return None
    languages = [x for x in before["gap"] if x != english]
    fig, ax = _language_bars(languages, "gap", before, after, teachers)
    ax.axhline(0, color="black", lw=0.8)
    values = [s["gap"][x] for s in (before, after) if s is not None for x in languages]
    lo, hi = min(0.0, *values), max(0.0, *values)
    pad = 0.18 * (hi - lo) + 1
    ax.set_ylim(lo - (pad if lo < 0 else 0), hi + pad)
    _finish_bars(ax, f"gap: acc({english}) - acc(t), points",
                 f"Gap to {english} per language (smaller is better)")  # fmt: skip
    return fig


def gap_plot(
    before: dict, after: dict | None, teachers: Sequence[str], english: str | None,
    path: str | Path,
) -> Path | None:  # fmt: skip
    fig = gap_figure(before, after, teachers, english)
    return None if fig is None else save_png(fig, path)


# ----------------------------------------------------------------------------- 3. selection


def selection_figure(selection: dict) -> Figure:
    """``selection.json``: s_t (mean confidence of the voted label) and shat_t (softmax over
    the languages) per language, theta on the shat_t panel; teachers (``teachers_used``,
    after any override, else ``teachers``) in dark orange."""
    per_lang = selection["languages"]  # {lang: {s_t, shat_t, agreement, role}}
    languages = list(per_lang)
    teachers = selection.get("teachers_used", selection["teachers"])
    colours = [TEACHER if x in teachers else BEFORE for x in languages]
    width = max(8.0, 1.1 * len(languages) + 3.0)
    fig = Figure(figsize=(width, 3.8), layout="constrained")
    ax_s, ax_h = fig.subplots(1, 2)
    for ax, key, title in (
        (ax_s, "s_t", "s_t: mean confidence of the voted label"),
        (ax_h, "shat_t", "shat_t = softmax over languages of s_t"),
    ):
        values = [per_lang[x][key] for x in languages]
        bars = ax.bar(range(len(languages)), values, color=colours)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1, bbox=LABEL_BOX)
        _role_ticks(ax, languages, teachers)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    theta = selection["threshold"]
    ax_h.axhline(theta, color=THRESHOLD, ls="--", lw=1.2)
    top = max(max(per_lang[x]["shat_t"] for x in languages), theta)
    ax_h.set_ylim(0, top * 1.3)
    ax_s.set_ylim(0, max(per_lang[x]["s_t"] for x in languages) * 1.2)
    handles = [
        Patch(color=TEACHER, label="teacher"),
        Patch(color=BEFORE, label="student"),
        ax_h.get_lines()[-1],
    ]
    handles[-1].set_label(f"theta = {theta:.4f}")
    ax_h.legend(handles=handles, loc="upper right", fontsize=8, framealpha=0.9)
    fig.suptitle(f"Teacher selection on {selection.get('num_examples', '?')} unlabeled examples")
    return fig


def selection_plot(selection: dict | None, path: str | Path) -> Path | None:
    return None if selection is None else save_png(selection_figure(selection), path)


# ----------------------------------------------------------------------------- 4. guard


def guard_panels(
    guard: dict, max_en_drop: float, min_entropy_ratio: float, min_agreement: float = 0.0
) -> list[dict]:
    """The guard's checks as curves, one panel each: {title, ylabel, lines {name: [y per
    check]}, threshold (a y value or None)}; x is ``steps`` (shared). The entropy panel is
    each language's mean-prediction entropy divided by its value at the start check, so the
    guard's rule "entropy >= guard_min_entropy_ratio x start" is one line at that ratio."""
    checks = guard["checks"]
    start = checks[0]
    languages = list(start["mean_prediction_entropy_bits"])
    panels = []
    if start.get("english_accuracy") is not None:
        panels.append({
            "title": "English dev accuracy",
            "ylabel": "accuracy (%)",
            "lines": {"english": [c["english_accuracy"] for c in checks]},
            "threshold": start["english_accuracy"] - max_en_drop,
            "threshold_label": f"start - {max_en_drop:g} (guard_max_en_drop)",
        })  # fmt: skip
    h0 = start["mean_prediction_entropy_bits"]
    panels.append({
        "title": "Mean-prediction entropy / start",
        "ylabel": "entropy ratio (start = 1)",
        "lines": {x: [_ratio(c["mean_prediction_entropy_bits"][x], h0[x]) for c in checks]
                  for x in languages},
        "threshold": min_entropy_ratio,
        "threshold_label": f"{min_entropy_ratio:g} x start (guard_min_entropy_ratio)",
    })  # fmt: skip
    panels.append({
        "title": "Agreement with the start's predictions",
        "ylabel": "agreement (%)",
        "lines": {x: [c["agreement_with_start"][x] for c in checks] for x in languages},
        "threshold": min_agreement if min_agreement > 0 else None,
        "threshold_label": f"{min_agreement:g}% (guard_min_agreement)",
    })  # fmt: skip
    anchor = "English" if start.get("english_accuracy") is not None else "the majority"
    panels.append({
        "title": f"Consistency with {anchor} (logged only)",
        "ylabel": "same prediction (%)",
        "lines": {"all": [c["consistency"] for c in checks]},
        "threshold": None,
        "threshold_label": "",
    })  # fmt: skip
    return panels


def _ratio(h: float, h0: float) -> float:
    return h / h0 if h0 > 0 else float("nan")


def guard_figure(
    guard: dict, max_en_drop: float, min_entropy_ratio: float, min_agreement: float = 0.0
) -> Figure | None:
    """The collapse guard's dev curves over distill steps (``DevMonitor.summary()``), the
    thresholds as red dashed lines, the kept (latest healthy) check as a green vertical line
    and the unhealthy checks as red crosses; one colour per language in every panel (legend
    below the panels). None without checks."""
    checks = guard.get("checks") or []
    if not checks:
        return None
    steps = [c["step"] for c in checks]
    bad = [i for i, c in enumerate(checks) if not c["healthy"]]
    panels = guard_panels(guard, max_en_drop, min_entropy_ratio, min_agreement)
    languages = list(checks[0]["mean_prediction_entropy_bits"])
    colours = {x: f"C{i % 10}" for i, x in enumerate(languages)}
    rows = (len(panels) + 1) // 2
    fig = Figure(figsize=(11, 3.0 * rows + 1.0), layout="constrained")
    axes = fig.subplots(rows, 2, squeeze=False).ravel()
    for ax, panel in zip(axes[: len(panels)], panels, strict=True):
        _guard_panel(ax, panel, steps, bad, colours, guard.get("best_step"))
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colours[x], marker="o", ms=3, label=x) for x in languages]
    if bad:
        handles.append(Line2D([], [], color=THRESHOLD, ls="none", marker="x", ms=7, mew=2,
                              label="unhealthy check"))  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 9),
               fontsize=8, frameon=False)  # fmt: skip
    stop = "; stopped early" if guard.get("stopped_early") else ""
    fig.suptitle(f"Collapse guard: dev checks of distill (final model from "
                 f"{guard.get('final_from', '?')}{stop})", fontsize=10)  # fmt: skip
    return fig


def _guard_panel(ax, panel: dict, steps, bad, colours: dict, best_step: int | None) -> None:
    """One quantity over the checks: a line per language (or one), thresholds, kept step."""
    for name, ys in panel["lines"].items():
        ax.plot(steps, ys, marker="o", ms=3, lw=1.3, color=colours.get(name, "#444444"))
        if bad:
            ax.plot([steps[i] for i in bad], [ys[i] for i in bad], "x", color=THRESHOLD,
                    ms=7, mew=2)  # fmt: skip
    if panel["threshold"] is not None:
        ax.axhline(panel["threshold"], color=THRESHOLD, ls="--", lw=1.2,
                   label=panel["threshold_label"])  # fmt: skip
    if best_step is not None:
        ax.axvline(best_step, color="#2e8b57", lw=1.5, alpha=0.8, label=f"kept: step {best_step}")
    ax.set_title(panel["title"], fontsize=10)
    ax.set_ylabel(panel["ylabel"])
    ax.set_xlabel("distill step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, framealpha=0.85)


def guard_plot(
    guard: dict | None, max_en_drop: float, min_entropy_ratio: float, path: str | Path,
    min_agreement: float = 0.0,
) -> Path | None:  # fmt: skip
    fig = None if guard is None else guard_figure(guard, max_en_drop, min_entropy_ratio,
                                                  min_agreement)  # fmt: skip
    return None if fig is None else save_png(fig, path)


# ----------------------------------------------------------------------------- 5. deltas


def covers_zero(row: dict) -> bool:
    """The row's interval cannot tell its delta from 0 (same rule as ``stats.Interval``)."""
    return row["lo"] <= 0.0 <= row["hi"]


def delta_colour(row: dict) -> str:
    """Grey where the interval covers 0, blue otherwise."""
    return COVERS_ZERO if covers_zero(row) else SIGNIFICANT


def _check_rows(rows: Sequence[dict]) -> None:
    if not rows:
        raise ValueError("delta_plot: no rows")
    for r in rows:
        if not r["lo"] <= r["delta"] <= r["hi"]:
            raise ValueError(f"delta_plot row {r['name']!r}: needs lo <= delta <= hi, got "
                             f"{r['lo']} / {r['delta']} / {r['hi']}")  # fmt: skip


def delta_figure(rows: Sequence[dict], title: str, unit: str = "points") -> Figure:
    """A forest plot: one row per variant, top to bottom in the given order, its delta as a
    dot with its interval as a horizontal error bar, a vertical line at 0; rows whose
    interval covers 0 in grey. ``rows``: [{name, delta, lo, hi, label (optional)}]."""
    _check_rows(rows)
    n = len(rows)
    fig = Figure(figsize=(8.5, 1.2 + 0.45 * n), layout="constrained")
    ax = fig.add_subplot()
    for i, r in enumerate(rows):
        y = n - 1 - i
        err = [[r["delta"] - r["lo"]], [r["hi"] - r["delta"]]]
        ax.errorbar(r["delta"], y, xerr=err, fmt="o", color=delta_colour(r), capsize=4, ms=6,
                    lw=1.8, gid=f"row:{r['name']}")  # fmt: skip
    ax.axvline(0, color="black", lw=0.9)
    ax.set_yticks(range(n), labels=[r["name"] for r in reversed(rows)])
    ax.set_ylim(-0.7, n - 0.3)
    right = ax.secondary_yaxis("right")
    right.set_yticks(range(n), labels=[_row_text(r) for r in reversed(rows)])
    right.tick_params(length=0, labelsize=8)
    ax.set_xlabel(f"delta ({unit}); bars: interval; grey: covers 0")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _row_text(r: dict) -> str:
    extra = f"  {r['label']}" if r.get("label") else ""
    return f"{r['delta']:+.2f} [{r['lo']:+.2f}, {r['hi']:+.2f}]{extra}"


def delta_plot(rows: Sequence[dict], title: str, path: str | Path, unit: str = "points") -> Path:
    return save_png(delta_figure(rows, title, unit), path)


# ----------------------------------------------------------------------------- a run's plots


def run_plots(
    folder: str | Path,
    before: dict,
    after: dict | None,
    teachers: Sequence[str],
    english: str | None,
    selection: dict | None,
    guard: dict | None,
    max_en_drop: float,
    min_entropy_ratio: float,
    min_agreement: float = 0.0,
) -> dict[str, Path]:
    """Every plot a run has the data for, as ``folder/<name>.png``: {name: path}, in order
    accuracy, gap (needs English), selection (needs selection.json), guard (needs checks)."""
    folder = Path(folder)
    made = {
        "accuracy": accuracy_plot(before, after, teachers, english, folder / "accuracy.png"),
        "gap": gap_plot(before, after, teachers, english, folder / "gap.png"),
        "selection": selection_plot(selection, folder / "selection.png"),
        "guard": guard_plot(
            guard, max_en_drop, min_entropy_ratio, folder / "guard.png", min_agreement
        ),  # fmt: skip
    }
    return {name: path for name, path in made.items() if path is not None}
