"""Stage-2 distillation step: this project's one-forward-per-view loss vs the authors' pairwise
scheme, same model, same batch, same pair set, same process.

- ours: ONE forward over all B x T views -> log_softmax -> ``[B, T, C]`` ->
  ``alsace_ds.method.pairs.pair_kl_loss(..., pairs="unordered")`` -> one backward.
- pairwise (pkunlp-icler/ALSACE, ``LMTrainer.compute_loss``): for every unordered pair (t1, t2)
  of ``build_pairs(..., "unordered")`` two forwards over the B views of each language and
  ``KLDivLoss(reduction="batchmean", log_target=True)(log_softmax(logits_t2),
  log_softmax(logits_t1))`` with gradients through BOTH sides. ``KLDivLoss(input, target)`` is
  KL(P_target || P_input), so the teacher side t2 is the input and this is KL(P_t1 || P_t2),
  pair_kl_loss's "forward" direction. The authors' Trainer runs one backward per batch of
  pair items; here each pair's loss / P is back-propagated in turn (gradients accumulate), so
  the value is the mean over pairs and the gradient that of the mean, at the memory of one
  pair.

A step is forward + backward with gradients reset before it (no optimizer step, so every
repeat sees the same weights); tokenization is done once, outside the timed region, for both.

Equality (dropout off): the two schemes compute the same loss and gradient in exact arithmetic.
The check runs one step of each in float64 (the model cast to double and back, which is
exact) on the first ``--check-batch`` examples and asserts the loss to ``--loss-rtol`` and the
gradients to ``--grad-rtol`` x the largest gradient. In float32 the two differ by rounding
(the batches are padded to different lengths and the sums run in another order); those fp32
values of the full batch (the warm-up step) are reported as well, not asserted: a randomly
initialised head gives nearly equal distributions, so the KL is tiny and float32 rounding is a
large fraction of it.

Device and precision (``--device cpu|cuda``, ``--dtype fp32|bf16``): the model's parameters stay
fp32 (master weights); ``bf16`` runs each step's forward under ``torch.autocast(bf16)``, as the
trainer does with ``model.dtype=bf16``. Logits are cast to fp32 before the softmax. The float64
check and the float32 full-batch step run without autocast whatever ``--dtype`` says; under
bf16 the first bf16 full-batch step is reported too. On CUDA every timer synchronizes the
device before it starts and before it stops.

Model FLOPs and MFU (encoder models: BERT / XLM-R): per step, 3 x the forward matmul FLOPs of
every sequence at its padded length (``common.encoder_forward_flops``, the PaLM / Megatron
count), over the median step time = achieved FLOP/s; MFU = that / the device's dense bf16 peak
(datasheet table in ``common``), and / a measured ``--matmul-n`` bf16 matmul beside it. The
formula is checked against torch's ``FlopCounterMode`` on one untimed "ours" step (attention
switched to eager for that step, so that every matmul is visible to the counter).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import common
import torch

SHAPES: dict[str, dict[str, Any]] = {
    # Any 7 of XNLI's 15 languages give the same pair count (77): C(7,2) + 7 x 8.
    "xnli": {
        "languages": common.XNLI_LANGUAGES,
        "teachers": ["en", "fr", "es", "de", "bg", "ru", "zh"],
        "num_labels": 3,
        "target": 15.0,
    },
    # PAWS-X with 3 teachers: C(3,2) + 3 x 4 = 15 pairs (any 3 give 15).
    "pawsx": {
        "languages": common.PAWSX_LANGUAGES,
        "teachers": ["en", "de", "fr"],
        "num_labels": 2,
        "target": 8.0,
    },
}


def make_batch(
    maker: common.TextMaker,
    languages: Sequence[str],
    batch: int,
    max_length: int,
    seed: int,
    min_tokens: int = 20,
    max_tokens: int = 40,
) -> list[dict[str, str]]:
    """B parallel examples: a base length in [min_tokens, max_tokens] per example, scaled per
    language (fixed factor x small jitter), each view a random sentence of that many pieces."""
    rng = random.Random(f"{seed}-batch")
    factors = common.language_factors(languages, seed)
    examples = []
    for _ in range(batch):
        base = rng.randint(min_tokens, max_tokens)
        ex = {}
        for lang in languages:
            k = round(base * factors[lang] * rng.uniform(0.9, 1.1))
            ex[lang] = maker.sentence(lang, min(max(k, 4), max_length - 2), rng)
        examples.append(ex)
    return examples


def _zero_grad(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # --dtype -> autocast dtype (None: off)


def _to(enc: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in enc.items()}


class Steps:
    """The two training steps over one pre-tokenized batch, on ``device``; ``autocast`` (a
    dtype or None) may be changed between steps."""

    def __init__(
        self,
        model,
        tokenizer,
        examples,
        languages,
        teachers,
        max_length,
        device: str | torch.device = "cpu",
        autocast: torch.dtype | None = None,
    ):
        from alsace_ds.data.tokens import encode_views
        from alsace_ds.method.pairs import build_pairs

        self.model = model
        self.device = torch.device(device)
        self.autocast = autocast
        self.languages = list(languages)
        self.teachers = list(teachers)
        self.batch = len(examples)
        self.pairs = build_pairs(self.languages, self.teachers, "unordered")
        flat = [ex[lang] for ex in examples for lang in self.languages]  # example-major
        # Tokenized once, on the CPU, then moved: neither is part of a timed step.
        self.all_views = _to(encode_views(tokenizer, flat, max_length), self.device)  # [B*T, L]
        self.per_lang = [
            _to(encode_views(tokenizer, [ex[lang] for ex in examples], max_length), self.device)
            for lang in self.languages
        ]  # T x [B, L_t]
        self.kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)

    def _compute(self) -> contextlib.AbstractContextManager:
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _logits(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        # The HF model's logits [n, C]: what XLMRClassifier.forward returns. It adds .float();
        # here only half precision is upcast, so that the float64 check stays float64.
        out = self.model.hf_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        logits = out.logits
        return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits

    def ours(self) -> float:
        from alsace_ds.method.pairs import pair_kl_loss

        _zero_grad(self.model)
        with self._compute():
            logits = self._logits(self.all_views)  # [B*T, C], ONE forward
            log_probs = torch.log_softmax(logits, dim=-1).view(self.batch, len(self.languages), -1)
            loss = pair_kl_loss(log_probs, self.languages, self.teachers, pairs="unordered")
        loss.backward()
        return float(loss.detach())

    def pairwise(self) -> float:
        _zero_grad(self.model)
        total = 0.0
        num = len(self.pairs)
        for t1, t2 in self.pairs:
            # Two forwards per pair (the authors' logits1 / logits2); no detach on either side.
            with self._compute():
                lp_teacher = torch.log_softmax(self._logits(self.per_lang[t2]), dim=-1)  # [B, C]
                lp_other = torch.log_softmax(self._logits(self.per_lang[t1]), dim=-1)  # [B, C]
                loss = self.kl(lp_teacher, lp_other)  # KL(P_t1 || P_t2), mean over B examples
            (loss / num).backward()
            total += float(loss.detach())
        return total / num


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Attention as plain matmuls while alive (restored after), so that ``FlopCounterMode``
    sees them: fused SDPA kernels are not counted on every device (the CPU's is not)."""
    # The attention layers of transformers 5 read the implementation from the config at
    # call time (set_attn_implementation also checks kernels and may refuse, with a warning).
    config = model.hf_model.config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def counted_flops(steps: Steps) -> int:
    """FLOPs torch's ``FlopCounterMode`` counts in one "ours" step (forward + backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with eager_attention(steps.model), FlopCounterMode(display=False) as counter:
        steps.ours()
    return int(counter.get_total_flops())


def compare_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    max_diff, max_abs, worst = 0.0, 0.0, ""
    for name, ga in a.items():
        diff = float((ga - b[name]).abs().max()) if ga.numel() else 0.0
        max_abs = max(max_abs, float(ga.abs().max()) if ga.numel() else 0.0)
        if diff > max_diff:
            max_diff, worst = diff, name
    return {
        "max_abs_diff": max_diff,
        "max_abs_grad": max_abs,
        "rel_to_max_grad": max_diff / max_abs if max_abs else 0.0,
        "worst_param": worst,
    }


def run_shape(
    name: str,
    model: torch.nn.Module,
    tokenizer: Any,
    args: argparse.Namespace,
    teachers: Sequence[str] | None = None,
    matmul: dict[str, Any] | None = None,
) -> dict[str, Any]:
    shape = SHAPES[name]
    languages = shape["languages"]
    teachers = list(teachers or shape["teachers"])
    device, autocast = args.device, DTYPES[args.dtype]
    maker = common.TextMaker(tokenizer, languages, args.seed)
    examples = make_batch(
        maker, languages, args.batch, args.max_length, args.seed, args.min_tokens, args.max_tokens
    )
    steps = Steps(model, tokenizer, examples, languages, teachers, args.max_length, device)
    lengths = steps.all_views["attention_mask"].sum(dim=1).tolist()
    num_pairs = len(steps.pairs)
    # Token positions each scheme runs through the model per step, padding included: ours
    # pads all B*T views to the longest of them, pairwise pads each language's B views.
    width = [enc["input_ids"].shape[1] for enc in steps.per_lang]
    ours_width = int(steps.all_views["input_ids"].shape[1])
    padded_tokens = {
        "ours": int(steps.all_views["input_ids"].numel()),
        "pairwise": sum(args.batch * (width[t1] + width[t2]) for t1, t2 in steps.pairs),
    }
    # Model FLOPs per step (forward + backward) of what each scheme computes: ours one forward
    # of B*T sequences at the common padded width; pairwise 2 forwards of B per pair at each
    # language's width. "non-pad" counts each view at its own length (the useful work).
    shape_cfg = common.encoder_shape(model.hf_model.config)
    flops = {
        "ours": common.step_flops(shape_cfg, [(args.batch * len(languages), ours_width)]),
        "ours_non_pad": common.step_flops(shape_cfg, [(1, n) for n in lengths]),
        "pairwise": common.step_flops(
            shape_cfg, [(args.batch, width[t]) for pair in steps.pairs for t in pair]
        ),
    }

    # Equality in float64 on the first check_batch examples (see the module docstring).
    check_n = args.check_batch or args.batch
    check = Steps(
        model, tokenizer, examples[:check_n], languages, teachers, args.max_length, device
    )
    grads_ours: dict[str, torch.Tensor] | None = None
    model.double()
    try:
        loss64_ours = check.ours()
        grads_ours = _grads(model)
        loss64_pair = check.pairwise()
        grad64 = compare_grads(grads_ours, _grads(model))
    finally:
        del grads_ours
        _zero_grad(model)
        model.float()
    rel64 = abs(loss64_ours - loss64_pair) / max(abs(loss64_pair), 1e-300)

    # Warm-up in float32 on the full batch; its losses and gradients are reported too.
    loss_ours = steps.ours()
    grads_ours = _grads(model)
    loss_pair = steps.pairwise()
    grad32 = compare_grads(grads_ours, _grads(model))
    del grads_ours
    rel32 = abs(loss_ours - loss_pair) / max(abs(loss_pair), 1e-30)
    # From here on the timed precision (--dtype); under bf16 its first step is compared too.
    steps.autocast = autocast
    low: dict[str, Any] | None = None
    if autocast is not None:
        lo_ours = steps.ours()
        grads_ours = _grads(model)
        lo_pair = steps.pairwise()
        low = {
            "loss": {
                "ours": lo_ours,
                "pairwise": lo_pair,
                "rel_diff": abs(lo_ours - lo_pair) / max(abs(lo_pair), 1e-30),
            },
            "grad": compare_grads(grads_ours, _grads(model)),
        }
        del grads_ours
    for _ in range(args.warmup - 1):
        steps.ours()
        steps.pairwise()
    # The FLOPs formula against torch's own count, on one untimed step of ours over the small
    # check batch (eager attention materialises [n, heads, L, L] scores: keep n small).
    check_width = int(check.all_views["input_ids"].shape[1])
    flops_check = {
        "examples": check_n,
        "sequences": check_n * len(languages),
        "padded_width": check_width,
        "formula": common.step_flops(shape_cfg, [(check_n * len(languages), check_width)]),
        "counted": counted_flops(check),
    }
    flops_check["formula_over_counted"] = (
        flops_check["formula"] / flops_check["counted"]
        if flops_check["formula"] and flops_check["counted"]
        else None
    )

    times: dict[str, list[float]] = {"ours": [], "pairwise": []}
    cpu: dict[str, list[float]] = {"ours": [], "pairwise": []}
    peak_mem: dict[str, int] = {"ours": 0, "pairwise": 0}
    on_cuda = torch.device(device).type == "cuda"
    for r in range(args.repeats):
        order = ("ours", "pairwise") if r % 2 == 0 else ("pairwise", "ours")
        for which in order:
            if on_cuda:
                torch.cuda.reset_peak_memory_stats()
            wall, cpu_s, _ = common.timed(getattr(steps, which), device)
            times[which].append(wall)
            cpu[which].append(cpu_s)
            if on_cuda:
                peak_mem[which] = max(peak_mem[which], int(torch.cuda.max_memory_allocated()))
        print(
            f"  [{name}] repeat {r + 1}/{args.repeats}: ours {times['ours'][-1]:.3f} s, "
            f"pairwise {times['pairwise'][-1]:.3f} s (wall)",
            flush=True,
        )
    med = {k: common.median(v) for k, v in times.items()}
    med_cpu = {k: common.median(v) for k, v in cpu.items()}
    paired = [p / o for o, p in zip(times["ours"], times["pairwise"], strict=True)]
    speedup = med["pairwise"] / med["ours"]
    achieved = {
        "ours": _tflops(flops["ours"], med["ours"]),
        "ours_non_pad": _tflops(flops["ours_non_pad"], med["ours"]),
        "pairwise": _tflops(flops["pairwise"], med["pairwise"]),
    }
    return {
        "shape": name,
        "device": str(device),
        "dtype": args.dtype,
        "compute": "fp32" if autocast is None else f"{args.dtype} autocast, fp32 parameters",
        "languages": list(languages),
        "teachers": teachers,
        "num_languages": len(languages),
        "num_pairs": num_pairs,
        "batch_examples": args.batch,
        "max_length": args.max_length,
        "view_pieces_drawn": [args.min_tokens, args.max_tokens],
        "padded_width": {"ours": ours_width, "pairwise_per_language": width},
        "view_tokens": common.length_stats(lengths),
        "forwards_per_example": {"ours": len(languages), "pairwise": 2 * num_pairs},
        "sequences_per_step": {
            "ours": args.batch * len(languages),
            "pairwise": 2 * num_pairs * args.batch,
        },  # fmt: skip
        "padded_tokens_per_step": padded_tokens,
        "seconds_per_step": times,
        "cpu_seconds_per_step": cpu,
        "median_seconds_per_step": med,
        "median_cpu_seconds_per_step": med_cpu,
        "examples_per_s": {k: args.batch / v for k, v in med.items()},
        "padded_tokens_per_s": {k: padded_tokens[k] / v for k, v in med.items()},
        "model_flops_per_step": flops,
        "model_flops_formula": FLOPS_FORMULA,
        "flops_check_vs_flop_counter": flops_check,
        "achieved_tflops": achieved,
        "mfu": _mfu(achieved, args.dtype, matmul),
        "cuda_peak_memory_bytes": peak_mem if on_cuda else None,
        "speedup": speedup,
        "speedup_paired_median": common.median(paired),
        "speedup_cpu_time": med_cpu["pairwise"] / med_cpu["ours"],
        "target_speedup": shape["target"],
        "target_met": speedup >= shape["target"],
        "check_float64": {
            "examples": check_n,
            "loss": {"ours": loss64_ours, "pairwise": loss64_pair, "rel_diff": rel64},
            "grad": grad64,
        },
        "float32_full_batch": {
            "loss": {"ours": loss_ours, "pairwise": loss_pair, "rel_diff": rel32},
            "grad": grad32,
        },
        "bf16_full_batch": low,
    }


FLOPS_FORMULA = (
    "per step = 3 x forward (backward = 2 x forward); forward per sequence of padded length s = "
    "s x [2 x layers x (4 h^2 + 2 h f) + 4 x layers x s x h] + 2 x (h^2 + h C) "
    "(weight matmuls, attention QK^T and PV, head on the first token; embeddings, norms, "
    "softmax, biases not counted)"
)


def _tflops(flops: int | None, seconds: float) -> float | None:
    return flops / seconds / 1e12 if flops is not None and seconds > 0 else None


def _mfu(
    achieved: dict[str, float | None], dtype: str, matmul: dict[str, Any] | None
) -> dict[str, Any]:
    """MFU of each scheme: achieved model FLOP/s / the datasheet's dense bf16 peak (the
    headline; only for bf16 compute, the precision of that peak) and / the measured matmul."""
    peak, source = (None, None)
    if dtype == "bf16" and matmul is not None and matmul.get("device_name"):
        peak, source = common.datasheet_peak_tflops(matmul["device_name"])
    measured = matmul["median_tflops"] if matmul else None
    out: dict[str, Any] = {
        "peak_datasheet_tflops": peak,
        "peak_source": source,
        "measured_matmul_tflops": measured,
    }
    for k, v in achieved.items():
        out[f"{k}_vs_datasheet"] = v / peak if v is not None and peak else None
        out[f"{k}_vs_measured_matmul"] = v / measured if v is not None and measured else None
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Prints a Markdown table and the machine; --out writes everything as JSON.",
    )
    common.add_common_args(p)
    p.add_argument(
        "--shapes",
        default="xnli,pawsx",
        help="comma list of xnli (15 languages, 7 teachers, 77 pairs) and pawsx (7 languages, "
        "3 teachers en/de/fr, 15 pairs) (default: both)",
    )
    p.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per view (default 64)")
    p.add_argument(
        "--min-tokens",
        type=int,
        default=20,
        help="shortest base length of an example, in pieces, before the per-language factor "
        "(default 20)",
    )
    p.add_argument(
        "--max-tokens", type=int, default=40, help="longest base length, in pieces (default 40)"
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the model runs (default cpu); cuda without a GPU is an error, never a fallback",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="fp32",
        help="compute precision of the timed steps: fp32, or bf16 autocast over fp32 "
        "parameters (default fp32)",
    )
    p.add_argument(
        "--matmul-n",
        type=int,
        default=None,
        help="size n of the n x n x n matmul measured as the device's practical peak "
        "(default 8192 on cuda, 1024 on cpu; 0 = skip)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each (default 1)")
    p.add_argument("--pawsx-teachers", default=None, help="comma list overriding PAWS-X's teachers")
    p.add_argument(
        "--check-batch",
        type=int,
        default=2,
        help="examples of the float64 equality step (0 = the whole batch; default 2)",
    )
    p.add_argument(
        "--loss-rtol",
        type=float,
        default=1e-6,
        help="assert float64 |loss_ours - loss_pairwise| / |loss_pairwise| <= this (default 1e-6)",
    )
    p.add_argument(
        "--grad-rtol",
        type=float,
        default=1e-6,
        help="assert float64 max |grad diff| <= this x max |grad| (default 1e-6)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        p.error(
            "--repeats and --warmup must be >= 1 (the first warm-up step is the equality check)"
        )
    if not 1 <= args.min_tokens <= args.max_tokens:
        p.error("need 1 <= --min-tokens <= --max-tokens")
    if args.matmul_n is None:
        args.matmul_n = 8192 if args.device == "cuda" else 1024
    args.shape_list = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shape_list if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.setup_env(args.device)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "distill_throughput: --device cuda but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); refusing to run on "
            "the CPU instead"
        )
    common.apply_threads(args.threads)
    torch.manual_seed(args.seed)
    path = common.resolve_model(args.model, seed=args.seed)
    results: dict[str, Any] = {
        "bench": "distill_throughput",
        "model": args.model,
        "model_path": str(path),
        "weights": (
            "random init, e5-small architecture"
            if args.model == "e5-random"
            else "random init, tiny XLM-R"
            if args.model == "tiny"
            else "from the model folder"
        ),
        "device": args.device,
        "dtype": args.dtype,
        "machine": common.machine_info(args.device),
        "shapes": {},
    }
    print(common.machine_line(results["machine"]), flush=True)
    matmul = None
    if args.matmul_n:
        mm_dtype = torch.float32 if DTYPES[args.dtype] is None else DTYPES[args.dtype]
        matmul = common.measure_matmul_tflops(args.device, args.matmul_n, mm_dtype)
        matmul["device_name"] = results["machine"].get("gpu_name")
        print(
            f"matmul {args.matmul_n}^3 {matmul['dtype']} on {args.device}: "
            f"{matmul['median_tflops']:.1f} TFLOP/s (median of {matmul['repeats']})",
            flush=True,
        )
    results["matmul"] = matmul
    failures = []
    for name in args.shape_list:
        shape = SHAPES[name]
        model, tok, warnings = common.load_model(path, shape["num_labels"], args.seed)
        model.to(args.device)
        results["num_params"] = common.count_params(model)
        results["load_warnings"] = warnings
        teachers = None
        if name == "pawsx" and args.pawsx_teachers:
            teachers = [t.strip() for t in args.pawsx_teachers.split(",")]
        print(f"{name}: model {args.model} ({results['num_params'] / 1e6:.1f}M params)", flush=True)
        res = run_shape(name, model, tok, args, teachers, matmul)
        results["shapes"][name] = res
        c64 = res["check_float64"]
        if not c64["loss"]["rel_diff"] <= args.loss_rtol:
            failures.append(
                f"{name}: float64 loss rel diff {c64['loss']['rel_diff']:.3g} > {args.loss_rtol}"
            )
        if not c64["grad"]["rel_to_max_grad"] <= args.grad_rtol:
            failures.append(
                f"{name}: float64 grad max abs diff {c64['grad']['max_abs_diff']:.3g} > "
                f"{args.grad_rtol} x max |grad| {c64['grad']['max_abs_grad']:.3g}"
            )
        del model
        common.write_json(args.out, results)  # after each shape: a killed run keeps the rest

    rows, eq_rows, mfu_rows = [], [], []
    for name, r in results["shapes"].items():
        m, fl = r["mfu"], r["model_flops_per_step"]
        mfu_rows.append([
            name, r["compute"], f"{r['batch_examples']} x {r['num_languages']} x "
            f"{r['padded_width']['ours']}", r["examples_per_s"]["ours"],
            _fmt(fl["ours"], 1e12, ".3f"), _fmt(r["achieved_tflops"]["ours"], 1, ".2f"),
            _pct(m["ours_vs_datasheet"]), _pct(m["ours_vs_measured_matmul"]),
            _fmt(r["achieved_tflops"]["pairwise"], 1, ".2f"), _pct(m["pairwise_vs_datasheet"]),
        ])  # fmt: skip
        rows.append([
            name, r["num_languages"], len(r["teachers"]), r["num_pairs"],
            f"{r['forwards_per_example']['ours']} vs {r['forwards_per_example']['pairwise']}",
            r["examples_per_s"]["ours"], r["examples_per_s"]["pairwise"],
            f"{r['speedup']:.1f}x", f"{r['speedup_cpu_time']:.1f}x",
            f">= {r['target_speedup']:.0f}x", "PASS" if r["target_met"] else "FAIL",
        ])  # fmt: skip
        c64, f32 = r["check_float64"], r["float32_full_batch"]
        for label, c in ((f"float64, {c64['examples']} ex.", c64), ("float32, full batch", f32)):
            eq_rows.append([
                name, label, f"{c['loss']['ours']:.10g}", f"{c['loss']['pairwise']:.10g}",
                f"{c['loss']['rel_diff']:.1e}", f"{c['grad']['max_abs_diff']:.1e}",
                f"{c['grad']['max_abs_grad']:.1e}",
            ])  # fmt: skip
    print()
    print(
        f"model {args.model} ({results['num_params'] / 1e6:.1f}M params), batch {args.batch} "
        f"examples, max_length {args.max_length}, median of {args.repeats} forward+backward "
        "steps; target met is judged on the wall-time speedup"
    )
    print(
        common.markdown_table(
            [
                "shape",
                "T",
                "teachers",
                "pairs",
                "forwards/example ours vs pairwise",
                "ours ex/s",
                "pairwise ex/s",
                "speedup (wall)",
                "speedup (CPU time)",
                "target",
                "target met",
            ],
            rows,
        )  # fmt: skip
    )
    print()
    print(
        common.markdown_table(
            [
                "shape",
                "step",
                "loss ours",
                "loss pairwise",
                "rel diff",
                "grad max abs diff",
                "max abs grad",
            ],
            eq_rows,
        )  # fmt: skip
    )
    print()
    mm = results["matmul"]
    peak = next(iter(results["shapes"].values()))["mfu"] if results["shapes"] else {}
    sheet = (
        f"{peak['peak_datasheet_tflops']} TFLOP/s, {peak['peak_source']}"
        if peak.get("peak_datasheet_tflops")
        else "none: not a listed device, or not bf16"
    )
    measured = f"{mm['n']}^3 {mm['dtype']} matmul, {mm['median_tflops']:.1f} TFLOP/s" if mm else "-"
    print(
        "model FLOPs per step = 3 x forward at the padded length (bench/README.md); MFU vs the "
        f"datasheet dense bf16 peak ({sheet}) and vs the measured ({measured})"
    )
    print(
        common.markdown_table(
            [
                "shape",
                "compute",
                "B x T x padded L",
                "ours ex/s",
                "ours TFLOP / step",
                "ours TFLOP/s",
                "ours MFU (datasheet)",
                "ours MFU (measured matmul)",
                "pairwise TFLOP/s",
                "pairwise MFU (datasheet)",
            ],
            mfu_rows,
        )  # fmt: skip
    )
    common.write_json(args.out, results)
    if failures:
        raise SystemExit("equality check failed:\n  " + "\n  ".join(failures))
    return results


def _fmt(x: float | None, scale: float, spec: str) -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x / scale, spec)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    main(sys.argv[1:])
