"""Limit benchmarks: each stage of the trainer against the bare model, same model, same inputs,
in one process per rank (issue 14).

- ``distill``: one distillation micro-step of the real recipe
  (``recipes.strategies.self_distillation``'s step under the run's DeepSpeed engine: the
  B x T_local views from the token cache, one forward, the view gather, the pair KL, backward,
  the ZeRO step) vs the bound, a plain copy of the model (no DeepSpeed) doing forward +
  backward of the same padded B x T_local sequences, and the same followed by a torch AdamW
  step (a whole bare training step): the table gives ours / (forward + backward) and ours /
  (forward + backward + AdamW).
- ``stage0``: the stage-0 micro-step (``recipes.alsace.stage0_step``) vs the same bound on the
  same English micro-batch.
- ``inference``: the selection's pass (``trainer.predict_probs`` over every unlabeled view,
  this rank's share) vs a bare ``no_grad`` forward over the same views sorted by token count,
  batched alike and collated before the clock starts. Both paddings are reported; the
  ``before`` row is the code before issue 14 (views sorted by characters, tokenized per batch).

The inputs are XNLI-shaped premise/hypothesis views in 15 languages (``selection_bucketing``'s
generator), written as the run's JSONL files and loaded by the real task loader; the config is
``configs/real-multiemo.yaml`` with those files and ``--model``. Every time is the median of
``--repeats`` repeats (each ``--steps`` steps) after a warm-up, ours and the bound interleaved.

``python bench/limits.py [--model e5] [--ranks 1|2] [--stages distill stage0 inference]
[--out FILE]``; ``--ranks 2`` relaunches itself under torchrun (2 ranks, gloo on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from selection_bucketing import char_lengths, make_views  # noqa: E402

from alsace_ds.parallel import free_port  # noqa: E402

STAGES = ("distill", "stage0", "inference")
CONFIG = common.REPO / "configs" / "real-multiemo.yaml"
TRAIN_EXAMPLES = 64  # English training rows: 2 ranks x a stage-0 micro-batch of 16, twice
GOALS = {"step_overhead": 0.10, "padding": 0.05, "throughput": 0.10}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    p.add_argument("--ranks", type=int, default=1, help="ranks (default 1; more via torchrun)")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--examples", type=int, default=200,
                   help="unlabeled (= dev = test) examples; the inference pass runs all their "
                   "views (default 200: 3,000 views)")  # fmt: skip
    p.add_argument("--micro-batch", type=int, default=4, help="distill examples per rank")
    p.add_argument("--stage0-batch", type=int, default=16, help="stage-0 examples per rank")
    p.add_argument("--infer-batch", type=int, default=64, help="views per inference forward")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="steps per timed repeat (default 2)")
    p.add_argument("--infer-repeats", type=int, default=None,
                   help="timed repeats of the inference pass (default --repeats)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=common.REPO / "runs" / "bench" / "limits")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs


def write_task(folder: Path, tok: Any, languages: list[str], n: int, seed: int) -> dict[str, str]:
    """XNLI-shaped parallel JSONL files: unlabeled, dev, test (``n`` examples each) and an
    English train file (``TRAIN_EXAMPLES``)."""
    maker = common.TextMaker(tok, languages, seed)
    total = 3 * n + TRAIN_EXAMPLES
    views = make_views(maker, languages, total, seed)  # [total * T] example-major
    T, rng = len(languages), random.Random(seed)
    rows = [
        {"id": f"x{i}", "label": rng.randrange(3),
         "text": {x: list(views[i * T + t]) for t, x in enumerate(languages)}}
        for i in range(total)
    ]  # fmt: skip
    parts = {"unlabeled": rows[:n], "dev": rows[n : 2 * n], "test": rows[2 * n : 3 * n]}
    parts["train"] = [{**r, "text": {"en": r["text"]["en"]}} for r in rows[3 * n :]]
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, part in parts.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        files[f"task.{name}_file"] = str(path)
    return files


def build_run(args: argparse.Namespace, model: Path, world: int):
    """The real config, task, parallel context and token cache of a run on the bench inputs."""
    from transformers import AutoTokenizer

    from alsace_ds import parallel
    from alsace_ds.config import load_config, with_world
    from alsace_ds.data.tasks import prepare_task
    from alsace_ds.recipes.run import Run, build_tokens, set_matmul_precision
    from alsace_ds.reporting.tb import TBLogger

    languages = common.XNLI_LANGUAGES
    data = args.workdir / f"data-{model.name}-n{args.examples}-s{args.seed}"
    tok = AutoTokenizer.from_pretrained(model)
    files = write_task(data, tok, languages, args.examples, args.seed)
    run_dir = args.workdir / f"run-{model.name}-w{world}"
    overrides = [
        f"model.name_or_path={model}", f"task.languages=[{','.join(languages)}]",
        "task.labels=[a,b,c]", f"task.max_unlabeled={args.examples}",
        f"model.max_length={args.max_length}", f"run.output_dir={run_dir}",
        f"distill.micro_batch={args.micro_batch}", f"stage0.micro_batch={args.stage0_batch}",
        f"selection.batch_size={args.infer_batch}", "log.progress=false",
        *(f"{k}={v}" for k, v in files.items()),
    ]  # fmt: skip
    cfg = with_world(load_config(CONFIG, overrides), world)
    cfg, task = prepare_task(cfg)
    ctx = parallel.init_distributed(cfg.deepspeed.timeout_s, 1)
    set_matmul_precision(cfg, ctx)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokens = build_tokens(cfg, task, ctx, run_dir)
    return Run(cfg, task, ctx, run_dir, TBLogger(run_dir / "tb", False), tokens)


def bare_model(run, model: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A plain copy of the run's model (no DeepSpeed), in training mode, with the same
    trainable parameters and a torch AdamW over them."""
    from alsace_ds.engine.trainer import make_optimizer
    from alsace_ds.models.scorers import load_scorer

    cfg = run.cfg
    scorer, _, _ = load_scorer(cfg.model.family, model, run.task.num_labels,
                               head=run.task.head, dropout=cfg.model.dropout)  # fmt: skip
    hf = scorer.hf_model.to(run.ctx.device)
    if cfg.model.freeze_embeddings:
        hf.get_input_embeddings().weight.requires_grad_(False)
    hf.train()
    return hf, make_optimizer(hf, cfg.distill.lr, cfg.distill.weight_decay)


# ----------------------------------------------------------------------------- timing


def interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int, steps: int, device,
    warm: dict[str, Callable[[], Any]] | None = None, sync: Callable[[], None] = lambda: None,
) -> dict:  # fmt: skip
    """Per-step wall seconds of each function: a warm-up (``warm``'s shorter version of a
    function where given), then ``repeats`` repeats of ``steps`` calls each, the order
    alternating (ABBA); medians and every repeat. ``sync`` (a barrier) lines the ranks up
    before each timed block, so that no rank's clock runs while it waits for another
    rank still busy with a different function."""
    for k, fn in fns.items():
        (warm or {}).get(k, fn)()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k in list(fns) if r % 2 == 0 else list(reversed(fns)):
            sync()
            wall, _, _ = common.timed(lambda k=k: [fns[k]() for _ in range(steps)], device)
            times[k].append(wall / steps)
    return {k: {"median_s": common.median(v), "repeats_s": v} for k, v in times.items()}


def barrier(ctx) -> None:
    from alsace_ds import parallel

    parallel.barrier(ctx)


def bare_train_fns(hf, opt, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable]:
    """The bound: forward + backward (any scalar of every logit), and the same followed by
    the torch AdamW step (a whole bare training step)."""

    def fwd_bwd() -> None:
        logits = hf(input_ids=ids, attention_mask=mask).logits.float()  # [B, C]
        logits.logsumexp(-1).mean().backward()

    def train_step() -> None:
        fwd_bwd()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd_only() -> None:
        fwd_bwd()
        opt.zero_grad(set_to_none=True)

    return {"bare_fwd_bwd": fwd_bwd_only, "bare_step": train_step}


def paired_ratio(t: dict, ours: str, *bound: str) -> float:
    """Median over repeats of ours / bound within each repeat (both ran back to back, so a
    slow moment of a shared machine cancels), not the ratio of the two medians."""
    reps = zip(t[ours]["repeats_s"], *(t[b]["repeats_s"] for b in bound), strict=True)
    return common.median([r[0] / sum(r[1:]) for r in reps])


def step_figures(t: dict) -> dict:
    return {
        "overhead_vs_fwd_bwd": paired_ratio(t, "ours", "bare_fwd_bwd") - 1,
        "overhead_vs_fwd_bwd_adamw": paired_ratio(t, "ours", "bare_step") - 1,
    }


def bench_step(run, model: Path, stage: str, args) -> dict:
    """One training micro-step of ``stage`` vs the bound on the same sequences."""
    from alsace_ds.engine.trainer import StepPlan, release_engine, to_device
    from alsace_ds.recipes.alsace import stage0_step
    from alsace_ds.recipes.run import make_engine
    from alsace_ds.recipes.strategies import local_languages, self_distillation

    ctx, task = run.ctx, run.task
    engine, tok, _ = make_engine(run, stage, str(model), 1000)
    engine.train()
    if stage == "stage0":
        step = stage0_step(run, engine)
        B = run.cfg.stage0.micro_batch
        views, langs = run.tokens.train, [task.train_language]
    else:
        teachers = task.languages[:7]
        step, _, _ = self_distillation(run, engine, tok, teachers, StepPlan(1, 1000, 1))
        B = run.cfg.distill.micro_batch
        views, langs = run.tokens.unlabeled, local_languages(task.languages, ctx)
    # The same examples on every rank: equal work, so the figure is our machinery's cost
    # (with data parallelism's gradient reduction), not one rank waiting for a longer batch.
    batch = list(range(B))
    ids, mask = views.views.batch(views.indices(batch, langs))
    texts = [getattr(task, "train" if stage == "stage0" else "unlabeled").examples[i].views[x]
             for i in batch for x in langs]  # fmt: skip
    hf, opt = bare_model(run, model)
    fns = {
        "ours": lambda: step(batch),
        **bare_train_fns(hf, opt, to_device(ids, ctx.device), to_device(mask, ctx.device)),
    }
    t = interleaved(fns, args.repeats, args.steps, ctx.device, sync=lambda: barrier(ctx))
    from alsace_ds.data.tokens import encode_views

    tokenize = interleaved({"tokenize": lambda: encode_views(tok, texts, run.cfg.model.max_length)},
                           args.repeats, args.steps, None)["tokenize"]  # fmt: skip
    release_engine(engine)
    pad = 1 - float(mask.sum()) / mask.numel()
    return {"stage": stage, "sequences": list(ids.shape), "padding": pad, "times": t,
            "tokenize_per_step_before_s": tokenize, **step_figures(t)}  # fmt: skip


def bench_inference(run, model: Path, args) -> dict:
    """The selection's pass (ours) vs the bare forward over the same views, token-sorted;
    and the code before issue 14 (character-sorted, tokenized per batch)."""
    from alsace_ds.data.batching import view_batches
    from alsace_ds.data.tokens import encode_views
    from alsace_ds.engine.trainer import predict_probs, release_engine, to_device
    from alsace_ds.recipes.evaluation import view_lang_ids
    from alsace_ds.recipes.run import make_engine

    ctx, cfg = run.ctx, run.cfg
    engine, tok, _ = make_engine(run, "distill", str(model), 1000)
    toks = run.tokens.unlabeled
    bs, V = cfg.selection.batch_size, len(toks.views)
    rows = view_lang_ids(run, toks)
    lengths = toks.views.lengths.tolist()
    ours_batches = view_batches(V, bs, ctx.rank, ctx.world_size, lengths)
    mine = sorted(range(ctx.rank, V, ctx.world_size), key=lambda i: -lengths[i])
    oracle = [mine[i : i + bs] for i in range(0, len(mine), bs)]
    prebuilt = [tuple(to_device(x, ctx.device) for x in toks.views.batch(b)) for b in oracle]
    texts = [ex.views[x] for ex in run.task.unlabeled.examples for x in run.task.languages]
    before_batches = view_batches(V, bs, ctx.rank, ctx.world_size, char_lengths(texts))
    hf = engine.module.hf_model

    @torch.no_grad()
    def bare() -> None:
        hf.eval()
        for ids, mask in prebuilt:
            torch.softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), -1)

    @torch.no_grad()
    def before() -> None:  # the old predict_probs: char order, a tokenizer call per batch
        engine.eval()
        for b, _ in before_batches:
            enc = encode_views(tok, [texts[i] for i in b], cfg.model.max_length)
            ids, mask = (
                to_device(enc["input_ids"], ctx.device),
                to_device(enc["attention_mask"], ctx.device),
            )
            torch.softmax(engine(ids, mask).float(), -1).cpu()

    def ours() -> None:
        predict_probs(engine, toks.views, ctx, bs, "selection", False, rows)

    engine.eval()
    fns = {"ours": ours, "bare_sorted": bare, "before": before}
    warm = {"ours": lambda: predict_probs(engine, toks.views.select(mine[:2 * bs]), ctx, bs,
                                          "warm-up", False),
            "bare_sorted": lambda: [hf(input_ids=i, attention_mask=m) for i, m in prebuilt[:2]],
            "before": lambda: None}  # fmt: skip
    with torch.no_grad():
        t = interleaved(fns, args.infer_repeats or args.repeats, 1, ctx.device, warm,
                        lambda: barrier(ctx))  # fmt: skip
    release_engine(engine)
    n_views = len(mine)
    thr = {k: n_views / v["median_s"] for k, v in t.items()}
    return {
        "stage": "inference", "views_per_rank": n_views, "batch": bs, "times": t,
        "views_per_s": thr, "throughput_vs_bare": 1 / paired_ratio(t, "ours", "bare_sorted"),
        "speedup_vs_before": paired_ratio(t, "before", "ours"),
        "padding": {"ours": toks.views.padding_fraction([b for b, _ in ours_batches]),
                    "bare_sorted": toks.views.padding_fraction(oracle),
                    "before": toks.views.padding_fraction([b for b, _ in before_batches])},
    }  # fmt: skip


# ----------------------------------------------------------------------------- main


def verdicts(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        if r["stage"] == "inference":
            pad, thr = r["padding"]["ours"], r["throughput_vs_bare"]
            out.append(f"inference: padding {pad:.3f} (goal <= {GOALS['padding']}: "
                       f"{'met' if pad <= GOALS['padding'] else 'NOT met'}), throughput "
                       f"{thr:.3f} of the bare sorted forward (goal >= "
                       f"{1 - GOALS['throughput']:.2f}: "
                       f"{'met' if thr >= 1 - GOALS['throughput'] else 'NOT met'})")  # fmt: skip
        else:
            o = r["overhead_vs_fwd_bwd"]
            ok = "met" if o <= GOALS["step_overhead"] else "NOT met"
            with_adamw = r["overhead_vs_fwd_bwd_adamw"]
            out.append(f"{r['stage']}: overhead {o:+.1%} vs bare forward+backward (goal <= "
                       f"{GOALS['step_overhead']:.0%}: {ok}); {with_adamw:+.1%} "
                       "vs forward+backward+AdamW")  # fmt: skip
    return out


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        t = r["times"]
        if r["stage"] == "inference":
            rows.append(["inference", f"{r['views_per_rank']} views", t["ours"]["median_s"],
                         t["bare_sorted"]["median_s"], "-", f"{r['throughput_vs_bare']:.3f}",
                         f"{r['padding']['ours']:.3f} (before {r['padding']['before']:.3f})",
                         t["before"]["median_s"]])  # fmt: skip
        else:
            rows.append([r["stage"], "x".join(map(str, r["sequences"])), t["ours"]["median_s"],
                         t["bare_fwd_bwd"]["median_s"], t["bare_step"]["median_s"],
                         f"{1 + r['overhead_vs_fwd_bwd']:.3f} "
                         f"({1 + r['overhead_vs_fwd_bwd_adamw']:.3f} w/ AdamW)",
                         f"{r['padding']:.3f}",
                         r["tokenize_per_step_before_s"]["median_s"]])  # fmt: skip
    head = ["stage", "sequences", "ours s", "bare fwd+bwd s", "bare + AdamW s",
            "ratio ours/bare", "padding",
            "before: s (inference) / tokenize s per step"]  # fmt: skip
    return common.markdown_table(head, rows)


def relaunch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
           "--master_port", str(free_port()), __file__, *argv]  # fmt: skip
    env = {**os.environ, "ALSACE_LIMITS_CHILD": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    common.setup_env("cuda" if torch.cuda.is_available() else "cpu")  # DeepSpeed's accelerator
    if args.ranks > 1 and "ALSACE_LIMITS_CHILD" not in os.environ:
        rc = relaunch(args, argv)
        if rc:
            raise SystemExit(rc)
        return json.loads(Path(args.out).read_text()) if args.out else None
    common.apply_threads(args.threads)
    from alsace_ds import parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = common.resolve_model(args.model)
    run = build_run(args, model, world)
    results = []
    for stage in args.stages:
        results.append(bench_inference(run, model, args) if stage == "inference"
                       else bench_step(run, model, stage, args))  # fmt: skip
    per_rank = parallel.all_gather_object(results, run.ctx)
    if not run.ctx.is_main:
        parallel.shutdown()
        return None
    info = common.machine_info()
    print(common.machine_line(info))
    print(f"model {args.model}, {world} rank(s), rank 0's figures:")
    print(table(results))
    lines = verdicts(results)
    print("\n".join(lines))
    out = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "world": world,
           "results": results, "per_rank": per_rank, "verdicts": lines}  # fmt: skip
    common.write_json(args.out, out)
    parallel.shutdown()
    return out


if __name__ == "__main__":
    main()
