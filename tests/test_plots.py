"""The run's figures (alsace_ds/reporting/plots.py): each writes a real, non-blank PNG whose
pixels carry the data's colours, the drawn bars / lines / intervals are the data (checked
against plain recomputations), missing data skips a plot, and TBLogger.image round-trips."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from alsace_ds.reporting import plots
from alsace_ds.reporting.tb import TBLogger

LANGS = ["en", "fr", "de", "sw"]
TEACHERS = ["en", "fr"]


def summ(acc: dict[str, float]) -> dict:
    """The part of ``summarize()`` the plots read."""
    return {"accuracy": acc, "gap": {x: acc["en"] - acc[x] for x in acc}}


BEFORE = summ({"en": 90.0, "fr": 80.0, "de": 70.0, "sw": 50.0})
AFTER = summ({"en": 89.0, "fr": 82.0, "de": 75.0, "sw": 60.0})
SELECTION = {
    "threshold": 0.25,
    "teachers": ["en", "fr"],
    "students": ["de", "sw"],
    "num_examples": 40,
    "languages": {
        "en": {"agreement": 90.0, "s_t": 0.9, "shat_t": 0.30, "role": "teacher"},
        "fr": {"agreement": 85.0, "s_t": 0.8, "shat_t": 0.27, "role": "teacher"},
        "de": {"agreement": 70.0, "s_t": 0.6, "shat_t": 0.23, "role": "student"},
        "sw": {"agreement": 50.0, "s_t": 0.5, "shat_t": 0.20, "role": "student"},
    },
    "teachers_used": ["en", "fr"],
}


def check(step: int, en: float, h: list[float], agree: list[float], healthy: bool) -> dict:
    """One entry of ``Guard.history``."""
    return {
        "step": step,
        "english_accuracy": en,
        "mean_prediction_entropy_bits": dict(zip(LANGS, h, strict=True)),
        "agreement_with_start": dict(zip(LANGS, agree, strict=True)),
        "consistency": 70.0 + step,
        "healthy": healthy,
        "problems": [] if healthy else ["sw collapsing"],
    }


GUARD = {
    "best_step": 4,
    "stopped_early": True,
    "final_from": "distill/best",
    "checks": [
        check(0, 90.0, [1.5, 1.4, 1.2, 1.0], [100, 100, 100, 100], True),
        check(4, 89.0, [1.5, 1.3, 1.1, 0.6], [99, 95, 90, 80], True),
        check(8, 87.0, [1.4, 1.2, 0.9, 0.3], [98, 90, 80, 60], False),
    ],
}


def colours_in(png) -> set[int]:
    """The distinct RGB colours of a PNG, each packed as 0xRRGGBB."""
    rgb = (mpimg.imread(str(png))[..., :3] * 255).round().astype(np.int64)  # [H, W, 3]
    return set(np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).tolist())


def has_colour(png, colour: str) -> bool:
    r, g, b = (round(255 * c) for c in to_rgb(colour))
    return r << 16 | g << 8 | b in colours_in(png)


def test_every_plot_writes_a_real_png(tmp_path):
    made = plots.run_plots(tmp_path / "plots", BEFORE, AFTER, TEACHERS, "en", SELECTION,
                           GUARD, 2.0, 0.5)  # fmt: skip
    made["delta"] = plots.delta_plot(
        [{"name": "a", "delta": 1.0, "lo": 0.5, "hi": 1.5}], "t", tmp_path / "plots" / "d.png"
    )
    assert list(made) == ["accuracy", "gap", "selection", "guard", "delta"]
    for name, png in made.items():
        assert png.parent == tmp_path / "plots" and png.stat().st_size > 0, name
        img = mpimg.imread(str(png))
        assert img.ndim == 3 and min(img.shape[:2]) > 150, name
        assert len(colours_in(png)) > 50, name  # text, bars, lines: not a blank canvas
    assert not list((tmp_path / "plots").glob("*.tmp")) and not list(tmp_path.glob(".*"))
    for name in ("accuracy", "gap"):  # both bar series and the teacher tick colour are drawn
        assert all(has_colour(made[name], c) for c in (plots.BEFORE, plots.AFTER, plots.TEACHER))
    assert has_colour(made["selection"], plots.TEACHER)
    assert has_colour(made["guard"], plots.THRESHOLD)


def test_accuracy_bars_are_the_data_and_without_distill_there_is_no_after(tmp_path):
    fig = plots.accuracy_figure(BEFORE, AFTER, TEACHERS, "en")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == [BEFORE["accuracy"][x] for x in LANGS] + [AFTER["accuracy"][x] for x in LANGS]
    assert sorted(ln.get_ydata()[0] for ln in ax.get_lines()) == [89.0, 90.0]  # English lines
    ticks = {t.get_text(): t.get_color() for t in ax.get_xticklabels()}
    assert ticks == {x: plots.TEACHER if x in TEACHERS else plots.STUDENT for x in LANGS}
    png = plots.accuracy_plot(BEFORE, None, TEACHERS, "en", tmp_path / "a.png")
    assert has_colour(png, plots.BEFORE) and not has_colour(png, plots.AFTER)
    gap = plots.gap_figure(BEFORE, AFTER, TEACHERS, "en").axes[0]
    expect = [90.0 - BEFORE["accuracy"][x] for x in LANGS[1:]]
    expect += [89.0 - AFTER["accuracy"][x] for x in LANGS[1:]]
    assert [p.get_height() for p in gap.patches] == pytest.approx(expect, abs=1e-12)


def test_selection_panels_and_theta():
    ax_s, ax_h = plots.selection_figure(SELECTION).axes
    per = SELECTION["languages"]
    assert [p.get_height() for p in ax_s.patches] == [per[x]["s_t"] for x in LANGS]
    assert [p.get_height() for p in ax_h.patches] == [per[x]["shat_t"] for x in LANGS]
    teacher = to_rgb(plots.TEACHER)
    assert [to_rgb(p.get_facecolor()) == teacher for p in ax_h.patches] == [1, 1, 0, 0]
    assert [ln.get_ydata()[0] for ln in ax_h.get_lines()] == [0.25]  # theta, on shat_t only
    assert ax_s.get_lines() == []


def test_guard_curves_thresholds_and_kept_step():
    panels = {p["title"]: p for p in plots.guard_panels(GUARD, 2.0, 0.5, min_agreement=85.0)}
    en = panels["English dev accuracy"]
    assert en["lines"] == {"english": [90.0, 89.0, 87.0]} and en["threshold"] == 88.0
    ratio = panels["Mean-prediction entropy / start"]
    h = [c["mean_prediction_entropy_bits"] for c in GUARD["checks"]]
    for x in LANGS:  # each language's entropy over its own start value
        assert ratio["lines"][x] == pytest.approx([h[i][x] / h[0][x] for i in range(3)])
    assert ratio["threshold"] == 0.5
    assert panels["Agreement with the start's predictions"]["threshold"] == 85.0
    axes = plots.guard_figure(GUARD, 2.0, 0.5).axes
    for ax in axes:
        kept = [ln for ln in ax.get_lines() if ln.get_label().startswith("kept")]
        assert [ln.get_xdata()[0] for ln in kept] == [4]
        crosses = [ln for ln in ax.get_lines() if ln.get_marker() == "x"]
        assert crosses and all(list(ln.get_xdata()) == [8] for ln in crosses)
    assert plots.guard_figure({**GUARD, "checks": []}, 2.0, 0.5) is None


def test_delta_plot_greys_the_rows_whose_interval_covers_zero():
    rows = [
        {"name": "gain", "delta": 2.0, "lo": 0.5, "hi": 3.0, "label": "2 seeds"},
        {"name": "noise", "delta": 0.3, "lo": -1.0, "hi": 1.5},
        {"name": "edge", "delta": 0.4, "lo": 0.0, "hi": 0.8},  # lo == 0: covers it
        {"name": "loss", "delta": -1.0, "lo": -1.8, "hi": -0.2},
    ]
    ax = plots.delta_figure(rows, "after - before").axes[0]
    assert len(ax.containers) == len(rows)
    for r, bar in zip(rows, ax.containers, strict=True):
        grey = r["lo"] <= 0 <= r["hi"]
        colour = to_rgb(bar.lines[0].get_color())  # the dot
        assert colour == to_rgb(plots.COVERS_ZERO if grey else plots.SIGNIFICANT), r["name"]
        assert to_rgb(bar.lines[2][0].get_color()[0]) == colour  # the interval bar
        ((x0, y0), (x1, y1)) = bar.lines[2][0].get_segments()[0]
        assert (x0, x1) == pytest.approx((r["lo"], r["hi"])) and y0 == y1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["loss", "edge", "noise", "gain"]
    assert [ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_linestyle() == "-"] == [0]
    with pytest.raises(ValueError, match="'bad'"):
        plots.delta_figure([{"name": "bad", "delta": 2.0, "lo": 0.0, "hi": 1.0}], "t")


def test_missing_data_skips_plots_and_their_links(tmp_path):
    made = plots.run_plots(tmp_path / "plots", BEFORE, None, TEACHERS, None, None, None, 2.0, 0.5)
    assert list(made) == ["accuracy"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["accuracy.png"]
    md = plots.figures_markdown(made, tmp_path)
    assert md == "\n## Figures\n\n![accuracy](plots/accuracy.png)\n"
    assert plots.figures_markdown({}, tmp_path) == ""
    assert plots.gap_plot(BEFORE, AFTER, TEACHERS, None, tmp_path / "g.png") is None
    no_checks = {**GUARD, "checks": []}
    assert plots.guard_plot(no_checks, 2.0, 0.5, tmp_path / "gd.png") is None
    assert not (tmp_path / "g.png").exists() and not (tmp_path / "gd.png").exists()


def test_tb_image_round_trips_the_png(tmp_path):
    png = plots.selection_plot(SELECTION, tmp_path / "s.png")
    tb = TBLogger(tmp_path / "tb", enabled=True)
    tb.image("plots/selection", png, 0)
    tb.close()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["plots/selection"]
    (event,) = acc.Images("plots/selection")
    src = (mpimg.imread(str(png))[..., :3] * 255).round().astype(np.uint8)  # [H, W, 3]
    assert (event.height, event.width) == src.shape[:2]
    import io

    from PIL import Image

    back = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert np.array_equal(back, src)  # lossless: the same pixels
    off = TBLogger(tmp_path / "off", enabled=False)
    off.image("plots/selection", png, 0)
    off.close()
    assert not (tmp_path / "off").exists()
