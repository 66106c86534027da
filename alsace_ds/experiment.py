"""The paper's whole experiment in one command: every ablation, baseline and ensemble, over
seeds, with confidence intervals.

``python -m alsace_ds.experiment --config CONFIG [--seeds 1 2] [--variants all|NAME ...]
[--out DIR] [--nproc N] [--jobs J] [key=value ...]`` (``make experiment``).

Per seed, with the real entry point under the real launcher (``deepspeed``, ``--nproc``
ranks):

1. ``<out>/seed<k>/stage0``: English fine-tuning only (``distill.enabled=false``); its test
   predictions are the model before distillation, its selection (the vote) gives the
   language groups of the tables and the ensembles' weights.
2. ``<out>/seed<k>/<variant>``: every variant of :data:`VARIANTS` starts from THAT model
   (``stage0.enabled=false stage0.init_from=...``), on the same unlabeled, dev and test
   slices (the data slices depend on the config and seed only, which the variants share).

A finished run (``report.json``) is skipped; a stopped one is relaunched and resumes from its
checkpoints; a run directory made with other overrides is refused. Then, from the saved
predictions alone (:mod:`alsace_ds.reporting.experiment`), ``<out>/`` gets
``table3.{md,csv}``, ``table4.{md,csv}``, ``table_options.{md,csv}`` (paper layouts, mean
over seeds), ``deltas.md`` (each variant vs the stage-0 model and vs ALSACE, 95% bootstrap
intervals per seed and over seeds), ``experiment.json`` (all of it), ``experiment.md`` and
``plots/deltas_*.png``; the console gets the verdicts in plain words.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from alsace_ds.io import atomic_write_json, atomic_write_text
from alsace_ds.parallel import free_port
from alsace_ds.tools.shm_cleanup import remove_stale

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    title: str  # the paper's row name
    table: str  # "table3" (selection ablations), "table4" (baselines), "options"
    overrides: tuple[str, ...]  # key=value on top of the experiment's config


#: Every variant the driver runs, in the paper's row order within each table. ALSACE is the
#: last row of every table. Exact definitions: README, "Ablations and baselines".
VARIANTS: dict[str, Variant] = {
    "exclude_weak_students": Variant(
        "Excluding Weak in Stu.", "table3", ("distill.pairs=teachers_only",)
    ),
    "exclude_weak_teachers": Variant(
        "Excluding Weak in Tea.", "table3", ("distill.students_teach=false",)
    ),
    "random_selection": Variant("Random selection", "table3", ("selection.rule=random",)),
    "no_selection": Variant("No Selection", "table3", ("selection.teachers=[all]",)),
    "scale_selection": Variant("Scale-Based Selection", "table3", ("selection.rule=scale",)),
    "english_self_training": Variant(
        "E. Self-Train.", "table4", ("distill.method=english_self_training",)
    ),
    "full_self_training": Variant(
        "F. Self-Train.", "table4", ("distill.method=full_self_training",)
    ),
    "unordered_pairs": Variant(
        "Unordered pairs (authors' code)", "options", ("distill.pairs=unordered",)
    ),  # fmt: skip
    "reverse_kl": Variant("Reverse KL", "options", ("distill.direction=reverse",)),
    "detached_teacher": Variant("Detached teacher", "options", ("distill.detach_teacher=true",)),
    "alsace": Variant("ALSACE", "all", ()),
}
TABLES = {"table3": "paper Table 3: teacher-selection ablations",
          "table4": "paper Table 4: self-training baselines",
          "options": "pair-policy, direction and detach options"}  # fmt: skip


# ----------------------------------------------------------------------------- launching


def launch(config: Path, overrides: list[str], nproc: int, log: Path) -> None:
    """One run of the real entry point under the deepspeed launcher; its output to ``log``."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           str(ROOT / "alsace_ds" / "train.py"), "--config", str(config), *overrides]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    remove_stale()  # the CPU all-reduce buffers of this run's ranks in /dev/shm
    print(f"  rc {rc} in {time.monotonic() - t0:.0f} s ({log})", flush=True)
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise SystemExit(f"run failed (rc {rc}); the end of {log}:\n" + "\n".join(tail))


@dataclass(frozen=True)
class Plan:
    config: Path
    out: Path
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    nproc: int
    overrides: tuple[str, ...]  # for every run

    def run_overrides(self, seed: int, name: str) -> list[str]:
        run_dir = self.out / f"seed{seed}" / name
        base = [*self.overrides, f"run.seed={seed}", f"run.output_dir={run_dir}",
                "log.progress=false"]  # fmt: skip
        if name == "stage0":
            return [*base, "distill.enabled=false"]
        return [*base, "stage0.enabled=false", f"stage0.init_from={stage0_model(run_dir.parent)}",
                *VARIANTS[name].overrides]  # fmt: skip


def stage0_model(seed_dir: Path) -> Path:
    """The seed's stage-0 model: the best by dev accuracy when one was kept, else the last."""
    best = seed_dir / "stage0" / "stage0" / "best"
    return best if (best / "config.json").is_file() else seed_dir / "stage0" / "stage0" / "model"


def check_configs(plan: Plan) -> None:
    """Every run's config is read and validated before the first run starts, so a bad
    override fails in seconds, not after hours of other runs."""
    from alsace_ds.config import ConfigError, load_config

    problems = []
    for name in ("stage0", *plan.variants):
        overrides = plan.run_overrides(plan.seeds[0], name)  # (the stage-0 model need not exist)
        try:
            load_config(plan.config, overrides)
        except ConfigError as err:
            problems.append(f"{name}: {err}")
    if problems:
        raise SystemExit(
            "experiment: the configs of these runs are invalid:\n" + "\n".join(problems)
        )


def ensure_run(plan: Plan, seed: int, name: str) -> None:
    """Run (or resume) one run unless it finished; refuse a directory made by other overrides."""
    run_dir = plan.out / f"seed{seed}" / name
    overrides = plan.run_overrides(seed, name)
    record = run_dir.parent / f"{name}.launch.json"
    if record.is_file() and json.loads(record.read_text())["overrides"] != overrides:
        raise SystemExit(
            f"experiment: {run_dir} was made with other overrides ({record}); remove it or "
            "choose another --out"
        )
    if (run_dir / "report.json").is_file():
        print(f"seed {seed} {name}: done already ({run_dir})", flush=True)
        return
    atomic_write_json(record, {"config": str(plan.config), "overrides": overrides})
    print(f"seed {seed} {name}: running", flush=True)
    launch(plan.config, overrides, plan.nproc, run_dir.with_suffix(".log"))


# ----------------------------------------------------------------------------- tables


def _english(plan: Plan) -> str | None:
    report = json.loads((plan.out / f"seed{plan.seeds[0]}" / "stage0" / "report.json").read_text())
    return report["english"]


def summarize(plan: Plan, draws: int = 2000) -> dict:
    """Tables, deltas and ensembles from the saved predictions; written under ``plan.out``."""
    from alsace_ds.reporting import experiment as rep

    en = _english(plan)
    seeds = [rep.load_seed(s, plan.out / f"seed{s}", plan.variants, en) for s in plan.seeds]
    titles = {rep.STAGE0: "stage-0 model", **{n: VARIANTS[n].title for n in plan.variants}}
    tables = {}
    for key in TABLES:
        rows = [(rep.STAGE0, titles[rep.STAGE0])] if key == "table4" else []
        rows += [(n, titles[n]) for n in plan.variants if VARIANTS[n].table in (key, "all")]
        if key == "table4" or any(n != "alsace" for n, _ in rows):  # Table 4: the start row
            tables[key] = rep.table(seeds, rows)
    vs_alsace = "alsace" in plan.variants
    deltas = rep.deltas(seeds, plan.variants, rep.STAGE0, draws)
    if vs_alsace:
        deltas += rep.deltas(seeds, plan.variants, "alsace", draws)
    verdicts = [rep.verdict(r["run"], titles[r["reference"]], k, r[k])
                for r in deltas for k in ("avg_accuracy", "avg_gap") if r.get(k)]  # fmt: skip
    ens = rep.ensembles(seeds, "alsace" if vs_alsace else None)
    guard = guard_outcomes(plan)
    result = {
        "seeds": list(plan.seeds),
        "variants": {n: {"title": VARIANTS[n].title, "table": VARIANTS[n].table,
                         "overrides": list(VARIANTS[n].overrides)} for n in plan.variants},
        "gap_divisor": "Delta(A) = sum of the non-English gaps / their number (paper Tables 2 "
                       "and 4); gap_A_15 divides the same sum by all languages (paper Table 3)",
        "groups": {str(s.seed): {"teachers": s.teachers, "students": s.students} for s in seeds},
        "tables": tables,
        "deltas": deltas,
        "verdicts": verdicts,
        "guard": guard,
        "ensembles": ens,
    }  # fmt: skip
    write_outputs(plan.out, result, titles)
    return result


def guard_outcomes(plan: Plan) -> dict[str, dict[str, dict]]:
    """Per variant and seed, what the collapse guard did (``report.json``'s ``guard``): a run
    it stopped at its first check reports the start model, so its delta is 0 by choice."""
    out: dict[str, dict[str, dict]] = {}
    for name in plan.variants:
        for seed in plan.seeds:
            report = json.loads((plan.out / f"seed{seed}" / name / "report.json").read_text())
            g = report.get("guard")
            if g:
                out.setdefault(name, {})[str(seed)] = {
                    "stopped_early": g["stopped_early"], "best_step": g["best_step"],
                    "start_model_kept": g["best_step"] == 0 and g["final_from"] != "last step",
                }  # fmt: skip
    return out


def _guard_lines(guard: dict, titles: dict) -> list[str]:
    lines = []
    for name, seeds in guard.items():
        kept = [k for k, g in seeds.items() if g["start_model_kept"]]
        early = [k for k, g in seeds.items() if g["stopped_early"] and not g["start_model_kept"]]
        if kept:
            lines.append(f"- {titles[name]}: the guard stopped distill at its first unhealthy "
                         f"check and kept the START model in seed(s) {', '.join(kept)} "
                         "(delta 0 there by the guard's choice)")  # fmt: skip
        if early:
            steps = ", ".join(f"{k} (step {seeds[k]['best_step']})" for k in early)
            lines.append(
                f"- {titles[name]}: stopped early, kept an earlier check in seed(s) {steps}"
            )
    return lines


def _markdown(result: dict, titles: dict) -> str:
    from alsace_ds.reporting import experiment as rep

    n = len(result["seeds"])
    md = [f"# Experiment: {len(result['variants'])} variant(s) x {n} seed(s)\n",
          f"Seeds {result['seeds']}; every variant starts from its seed's stage-0 model, on the "
          "same test examples. Accuracy in %, mean over seeds (± sample sd). "
          f"{result['gap_divisor']}. Groups: each seed's vote (teachers / students of "
          "the stage-0 model): " + "; ".join(
              f"seed {k}: T = {', '.join(v['teachers'])} | S = {', '.join(v['students']) or '–'}"
              for k, v in result["groups"].items()) + ".\n"]  # fmt: skip
    for key, rows in result["tables"].items():
        md += [f"## {TABLES[key]}\n", rep.table_markdown(rows)]
    md += ["## Deltas with 95% bootstrap intervals\n",
           "Over seeds: seeds and test examples resampled together (the spread from seed to "
           "seed included); **bold**: the interval excludes 0. Gap: lower is better.\n",
           rep.deltas_markdown(result["deltas"], titles),
           "\n".join(f"- {v}" for v in result["verdicts"]) + "\n"]  # fmt: skip
    lines = _guard_lines(result["guard"], titles)
    md += ["## The collapse guard\n", "\n".join(lines) + "\n" if lines else
           "The guard let every run train to its last step.\n"]  # fmt: skip
    if result["ensembles"]:
        md += ["## Test-time ensembles (paper Figure 4)\n",
               "Accuracy of one prediction per test example (weights: the stage-0 model's "
               "shat_t), mean over seeds.\n",
               rep.ensembles_markdown(result["ensembles"])]  # fmt: skip
    return "\n".join(md)


def write_outputs(out: Path, result: dict, titles: dict) -> None:
    from alsace_ds.reporting import experiment as rep

    for key, rows in result["tables"].items():
        name = "table_options" if key == "options" else key
        atomic_write_text(out / f"{name}.csv", rep.table_csv(rows))
        atomic_write_text(out / f"{name}.md", rep.table_markdown(rows))
    atomic_write_text(out / "deltas.md", rep.deltas_markdown(result["deltas"], titles))
    plots = delta_plots(out, result["deltas"], titles)
    atomic_write_json(out / "experiment.json", result)
    md = _markdown(result, titles)
    md += "\n## Figures\n\n" + "\n\n".join(f"![{p.stem}](plots/{p.name})" for p in plots) + "\n"
    atomic_write_text(out / "experiment.md", md)


def delta_plots(out: Path, deltas: list[dict], titles: dict) -> list[Path]:
    """One forest plot per (statistic, reference) of the over-seeds intervals."""
    from alsace_ds.reporting.plots import delta_plot

    paths = []
    for key, what in (("avg_accuracy", "average accuracy"), ("avg_gap", "average gap")):
        for ref in dict.fromkeys(r["reference"] for r in deltas):
            rows = [{"name": titles[r["run"]], "delta": r[key]["delta"], "lo": r[key]["lo"],
                     "hi": r[key]["hi"], "label": f"{r[key]['seeds']} seed(s)"}
                    for r in deltas if r["reference"] == ref and r.get(key)]  # fmt: skip
            if rows:
                title = f"{what}: variant - {titles.get(ref, ref)} (95% interval)"
                paths.append(delta_plot(rows, title, out / "plots" / f"deltas_{key}_vs_{ref}.png"))
    return paths


# ----------------------------------------------------------------------------- entry point


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: list[str] | None) -> tuple[Plan, int]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--variants", nargs="+", default=["all"],
                    help=f"'all' or some of: {', '.join(VARIANTS)}")  # fmt: skip
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "experiment")
    ap.add_argument("--nproc", type=int, default=1, help="ranks per run")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at once (CPU machines: jobs x nproc <= cores)")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = ap.parse_args(argv)
    names = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; choose 'all' or some of {list(VARIANTS)}")
    if len(set(args.seeds)) != len(args.seeds):
        ap.error(f"--seeds: repeated seed in {args.seeds}")
    if args.jobs > 1 and os.environ.get("DS_ACCELERATOR") != "cpu" and _has_gpu():
        ap.error("--jobs > 1 would share the same GPUs between runs; use --jobs 1 on GPUs")
    names = [n for n in VARIANTS if n in names]  # the paper's order
    plan = Plan(args.config.resolve(), args.out.resolve(), tuple(args.seeds), tuple(names),
                args.nproc, tuple(args.overrides))  # fmt: skip
    return plan, max(1, args.jobs)


def run_all(plan: Plan, jobs: int) -> None:
    """Every seed's stage 0, then its variants (which need that model), ``jobs`` runs at a
    time; the first failure stops new runs and is raised once the running ones end."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        pending = {pool.submit(ensure_run, plan, seed, "stage0"): seed for seed in plan.seeds}
        failure = None
        while pending:
            done = next(as_completed(pending))
            seed = pending.pop(done)
            try:
                done.result()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others
                failure = failure or err
                continue
            if seed is not None and failure is None:
                pending.update(
                    {pool.submit(ensure_run, plan, seed, n): None for n in plan.variants}
                )
        if failure is not None:
            raise failure


def run_experiment(plan: Plan, jobs: int = 1) -> dict:
    check_configs(plan)
    t0 = time.monotonic()
    run_all(plan, jobs)
    result = summarize(plan)
    print(f"\nexperiment: {len(plan.variants)} variant(s) x {len(plan.seeds)} seed(s) in "
          f"{time.monotonic() - t0:.0f} s; tables in {plan.out}\n", flush=True)  # fmt: skip
    print((plan.out / "experiment.md").read_text(), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    run_experiment(*parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
