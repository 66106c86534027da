"""Stage-1 selection inference: length-bucketed batching vs arrival-order batching.

N parallel examples x T languages = N*T views (XNLI-like premise/hypothesis pairs with a
realistic spread of lengths), in the original view order ``v = i*T + t`` (the row order of
``probs.reshape(-1, C)`` that ``select_teachers`` uses). Two batchings of the same views,
both from ``alsace_ds.data.batching.view_batches`` on one rank:

- arrival: consecutive views in their original order (``lengths=None``);
- bucketed: views sorted longest first by the length ``predict_probs`` uses (characters of
  the view, summed over a pair), as ``trainer.predict_probs`` does.

Each batch is tokenized (padded to its longest view), run through the model in eval mode
under ``no_grad`` and soft-maxed, like ``predict_probs``; the probabilities are put back in the
original view order. Reported: sequences/s (median of ``--repeats``, wall and CPU time), the
padding fraction (pad tokens / all tokens of the batches) of each order and of an oracle that
sorts by token count, and the checks: probabilities equal within ``--prob-atol``, and
``select_teachers`` on both gives IDENTICAL pseudo-labels and the same teachers (asserted);
the bucketed probabilities also equal those of the real ``trainer.predict_probs``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from collections.abc import Sequence
from typing import Any

import common
import torch

LANGUAGE_SETS = {"xnli": common.XNLI_LANGUAGES, "pawsx": common.PAWSX_LANGUAGES}


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return min(hi, max(lo, round(math.exp(rng.gauss(math.log(median), sigma)))))


def make_views(
    maker: common.TextMaker, languages: Sequence[str], num_examples: int, seed: int
) -> list[tuple[str, str]]:
    """``N*T`` (premise, hypothesis) views in example-major order. Lengths in pieces: premise
    log-normal around 22 (5..110), hypothesis around 10 (3..40), per-language factor and
    jitter, as in XNLI where premises range from a few words to long sentences."""
    rng = random.Random(f"{seed}-selection")
    factors = common.language_factors(languages, seed, spread=0.25)
    views = []
    for _ in range(num_examples):
        prem = _lognormal_int(rng, 22, 0.55, 5, 110)
        hyp = _lognormal_int(rng, 10, 0.45, 3, 40)
        for lang in languages:
            f = factors[lang]
            a = max(2, round(prem * f * rng.uniform(0.85, 1.15)))
            b = max(2, round(hyp * f * rng.uniform(0.85, 1.15)))
            views.append((maker.sentence(lang, a, rng), maker.sentence(lang, b, rng)))
    return views


def char_lengths(views: Sequence[Any]) -> list[int]:
    """The length key ``trainer.predict_probs`` sorted by before issue 14 (it now sorts by
    token count, known once the views are tokenized: ``bench/limits.py``)."""
    return [len(v) if isinstance(v, str) else sum(len(x) for x in v) for v in views]


@torch.no_grad()
def infer(
    model: torch.nn.Module,
    tokenizer: Any,
    views: Sequence[Any],
    batches: list[tuple[list[int], list[bool]]],
    max_length: int,
    num_labels: int,
) -> tuple[torch.Tensor, int, int]:
    """(probs ``[V, C]`` in original view order, pad tokens, all tokens)."""
    from alsace_ds.data.tokens import encode_views

    probs = torch.full((len(views), num_labels), float("nan"))
    pad = total = 0
    for indices, valid in batches:
        enc = encode_views(tokenizer, [views[i] for i in indices], max_length)
        mask = enc["attention_mask"]
        total += mask.numel()
        pad += int(mask.numel() - mask.sum())
        logits = model(enc["input_ids"], mask).float()  # [b, C]
        keep = torch.tensor(valid, dtype=torch.bool)
        probs[torch.tensor(indices)[keep]] = torch.softmax(logits, dim=-1)[keep]
    return probs, pad, total


def oracle_padding(token_lens: Sequence[int], batch_size: int) -> float:
    """Padding fraction if the views were sorted by their true token count."""
    lens = sorted(token_lens, reverse=True)
    pad = total = 0
    for i in range(0, len(lens), batch_size):
        chunk = lens[i : i + batch_size]
        total += len(chunk) * chunk[0]
        pad += len(chunk) * chunk[0] - sum(chunk)
    return pad / total


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints a Markdown table and the machine; --out writes everything as JSON.",
    )
    common.add_common_args(p)
    p.add_argument("--examples", type=int, default=200, help="parallel examples N (default 200)")
    p.add_argument(
        "--languages",
        default="xnli",
        help="xnli (15 languages), pawsx (7) or a comma list of codes (default xnli)",
    )
    p.add_argument("--labels", type=int, default=3, help="number of labels C (default 3)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="views per forward (default 64, as selection)"
    )
    p.add_argument("--max-length", type=int, default=128, help="tokens per view (default 128)")
    p.add_argument("--prob-atol", type=float, default=1e-5, help="assert max |probs diff| <= this")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.examples < 1:
        p.error("--repeats and --examples must be >= 1")
    langs = LANGUAGE_SETS.get(args.languages)
    args.language_list = langs or [x.strip() for x in args.languages.split(",") if x.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    common.setup_env()
    args = parse_args(argv)
    common.apply_threads(args.threads)
    from alsace_ds.data.batching import view_batches
    from alsace_ds.engine.trainer import predict_probs
    from alsace_ds.method.selection import select_teachers, view_predictions
    from alsace_ds.parallel import ParallelContext

    path = common.resolve_model(args.model)
    model, tok, warnings = common.load_model(path, args.labels, args.seed)
    languages = args.language_list
    n, t, c = args.examples, len(languages), args.labels
    maker = common.TextMaker(tok, languages, args.seed)
    views = make_views(maker, languages, n, args.seed)
    tok_lens = common.token_lengths(tok, views, args.max_length)
    info = common.machine_info()
    print(common.machine_line(info))
    print(
        f"model {args.model} ({common.count_params(model) / 1e6:.1f}M params): {n} examples x "
        f"{t} languages = {len(views)} views, tokens/view {common.length_stats(tok_lens)}",
        flush=True,
    )

    lengths = char_lengths(views)
    batchings = {
        "arrival": view_batches(len(views), args.batch_size, 0, 1, None),
        "bucketed": view_batches(len(views), args.batch_size, 0, 1, lengths),
    }
    run = {
        k: (lambda b=b: infer(model, tok, views, b, args.max_length, c))
        for k, b in batchings.items()
    }

    # Warm-up pass of each order; its outputs are the ones checked.
    outputs = {k: fn() for k, fn in run.items()}
    wall: dict[str, list[float]] = {k: [] for k in run}
    cpu: dict[str, list[float]] = {k: [] for k in run}
    for r in range(args.repeats):
        order = list(run) if r % 2 == 0 else list(reversed(run))
        for k in order:
            w, cs, _ = common.timed(run[k])
            wall[k].append(w)
            cpu[k].append(cs)
        print(
            f"  repeat {r + 1}/{args.repeats}: arrival {wall['arrival'][-1]:.2f} s, "
            f"bucketed {wall['bucketed'][-1]:.2f} s (wall)",
            flush=True,
        )

    # The real inference path (token cache, batches sorted by token count) gives the same
    # probabilities (other batches: float noise only).
    from alsace_ds.data.tokens import TokenizedViews, pad_id, tokenize_views

    toks = TokenizedViews.from_lists(tokenize_views(tok, views, args.max_length), pad_id(tok),
                                     tok.padding_side)  # fmt: skip
    idx, pp = predict_probs(model, toks, ParallelContext(), args.batch_size, "selection", False)
    real = torch.empty(len(views), c)
    real[idx] = pp

    pa, pb = outputs["arrival"][0], outputs["bucketed"][0]
    sel_a = select_teachers(pa.view(n, t, c), languages)
    sel_b = select_teachers(pb.view(n, t, c), languages)
    flips = int((view_predictions(pa.double()) != view_predictions(pb.double())).sum())
    checks = {
        "probs_max_abs_diff": float((pa - pb).abs().max()),
        "pseudo_labels_identical": bool(torch.equal(sel_a.pseudo_labels, sel_b.pseudo_labels)),
        "teachers_identical": sel_a.teachers == sel_b.teachers,
        "view_prediction_flips": flips,
        "scores_max_abs_diff": float((sel_a.scores - sel_b.scores).abs().max()),
        "predict_probs_max_abs_diff_vs_bucketed": float((real - pb).abs().max()),
    }
    med = {k: common.median(v) for k, v in wall.items()}
    med_cpu = {k: common.median(v) for k, v in cpu.items()}
    per_order = {
        k: {
            "batches": len(batchings[k]),
            "pad_tokens": outputs[k][1],
            "all_tokens": outputs[k][2],
            "padding_fraction": outputs[k][1] / outputs[k][2],
            "seconds": wall[k],
            "cpu_seconds": cpu[k],
            "median_seconds": med[k],
            "median_cpu_seconds": med_cpu[k],
            "sequences_per_s": len(views) / med[k],
            "sequences_per_cpu_s": len(views) / med_cpu[k],
        }
        for k in run
    }
    results = {
        "bench": "selection_bucketing",
        "model": args.model,
        "model_path": str(path),
        "num_params": common.count_params(model),
        "load_warnings": warnings,
        "machine": info,
        "examples": n,
        "languages": languages,
        "views": len(views),
        "labels": c,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "view_tokens": common.length_stats(tok_lens),
        "orders": per_order,
        "oracle_token_sorted_padding_fraction": oracle_padding(tok_lens, args.batch_size),
        "speedup": med["arrival"] / med["bucketed"],
        "speedup_cpu_time": med_cpu["arrival"] / med_cpu["bucketed"],
        "teachers": sel_b.teachers,
        "checks": checks,
    }

    rows = [
        [k, per_order[k]["batches"], per_order[k]["padding_fraction"],
         per_order[k]["sequences_per_s"], per_order[k]["sequences_per_cpu_s"]]
        for k in run
    ]  # fmt: skip
    print()
    print(
        f"model {args.model}, {len(views)} views ({n} x {t}), batch {args.batch_size}, "
        f"max_length {args.max_length}, median of {args.repeats}; bucketed speedup "
        f"{results['speedup']:.2f}x (wall), {results['speedup_cpu_time']:.2f}x (CPU time); "
        f"oracle (sorted by tokens) padding {results['oracle_token_sorted_padding_fraction']:.3f}"
    )
    print(
        common.markdown_table(
            ["order", "batches", "padding fraction", "sequences/s (wall)", "sequences/CPU-s"], rows
        )
    )
    print(
        f"checks: probs max abs diff {checks['probs_max_abs_diff']:.2e} (<= {args.prob_atol}); "
        f"pseudo-labels identical {checks['pseudo_labels_identical']}; teachers identical "
        f"{checks['teachers_identical']} ({sel_b.teachers}); per-view argmax flips {flips}; "
        f"predict_probs vs bucketed {checks['predict_probs_max_abs_diff_vs_bucketed']:.2e}"
    )
    common.write_json(args.out, results)
    failures = []
    if not checks["probs_max_abs_diff"] <= args.prob_atol:
        failures.append(f"probabilities differ by {checks['probs_max_abs_diff']:.3g}")
    if not checks["pseudo_labels_identical"]:
        failures.append("pseudo-labels differ")
    if not checks["teachers_identical"]:
        failures.append(f"teachers differ: {sel_a.teachers} vs {sel_b.teachers}")
    if not checks["predict_probs_max_abs_diff_vs_bucketed"] <= args.prob_atol:
        failures.append("trainer.predict_probs differs from the bucketed pass")
    if failures:
        raise SystemExit("selection check failed: " + "; ".join(failures))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
