"""DeepSpeed plumbing: build a ZeRO engine around a LabelScorer, train it, run inference.

Everything here runs the same work on every rank: batches come from
``alsace_ds.data.batching`` (equal counts per rank, padded), so ZeRO-3's per-forward parameter
gathers line up across ranks. Collectives go through ``alsace_ds.parallel``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from alsace_ds import parallel
from alsace_ds.data.batching import train_batches, view_batches
from alsace_ds.data.tokens import TokenizedViews
from alsace_ds.engine import signals
from alsace_ds.engine.ds_config import zero_stage
from alsace_ds.engine.schedules import lr_factor
from alsace_ds.models.scorers import LabelScorer, load_scorer

# Inference loops and exports poll for an agreed stop request every this many batches /
# parameters (one 4-byte all-reduce; on XNLI's 75k test views that is every ~0.1 s).
STOP_POLL_BATCHES = 8
STOP_POLL_PARAMS = 64


def poll_stop(i: int, every: int, ctx: parallel.ParallelContext, what: str) -> None:
    """At iteration ``i`` of a loop every rank runs equally often: raise
    ``signals.StopRequested`` on every rank when any rank was asked to stop."""
    if i % every == 0 and parallel.any_rank([signals.requested()], ctx)[0]:
        raise signals.StopRequested(f"stopped during {what} ({signals.reason()})")


# ----------------------------------------------------------------------------- model + engine


@contextlib.contextmanager
def zero3_init(ds_config: dict[str, Any]) -> Iterator[None]:
    """While alive, ``from_pretrained`` builds the model already partitioned (ZeRO-3).

    transformers consults a module-level weak reference to a live ``HfDeepSpeedConfig``.
    """
    if zero_stage(ds_config) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep


def load_for_stage(
    family: str,
    source: str,
    num_labels: int,
    label_words: list[list[str]] | None,
    dropout: float | None,
    ds_config: dict[str, Any],
    head: str | None = None,
    languages: list[str] | None = None,
    freeze_embeddings: bool = False,
) -> tuple[LabelScorer, Any, list[str]]:
    # mT5 checkpoints keep lm_head separate from the shared embedding. transformers 5 decides
    # whether to untie them by comparing the two loaded tensors, and under zero.Init those are
    # empty partitions that compare equal, so the head would silently be TIED to the embedding
    # (a different model). mT5 is therefore loaded whole and partitioned by deepspeed.initialize
    # instead (costs one full CPU copy per rank while loading).
    # Parameters are always fp32, whatever model.dtype says: bf16 is a compute dtype
    # (DeepSpeed's torch_autocast, see ds_config.stage_values), so the module holds the master
    # weights that are evaluated and exported.
    init = zero3_init(ds_config) if family != "mt5" else contextlib.nullcontext()
    with init:
        scorer, tok, warnings = load_scorer(
            family,
            source,
            num_labels,
            head=head,
            label_words=label_words,
            languages=languages,
            dropout=dropout,
            dtype=torch.float32,
        )
    if freeze_embeddings:  # before the optimizer is built: it only takes trainable parameters
        scorer.hf_model.get_input_embeddings().weight.requires_grad_(False)
    return scorer, tok, warnings


def _no_decay(name: str, param: Tensor) -> bool:
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 placeholders keep ds_shape
    return len(shape) < 2 or "norm" in name.lower() or name.endswith(".bias")


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def build_engine(
    module: LabelScorer,
    ds_config: dict[str, Any],
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "linear",
) -> Any:
    """A DeepSpeed engine with a torch AdamW (no JIT-compiled DeepSpeed optimizer needed) and
    the ``schedule`` of :func:`alsace_ds.engine.schedules.lr_factor`."""
    optimizer = make_optimizer(module, lr, weight_decay)
    factor = lr_factor(schedule, total_steps, warmup_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
        config=ds_config,
    )
    return engine


def release_engine(engine: Any) -> None:
    """Free an engine that is replaced: DeepSpeed's ``destroy`` drops its optimizer state,
    hooks and buffers (ZeRO keeps references of its own, so ``del`` alone frees nothing);
    the caller drops its last references and the accelerator's cache is emptied."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import parameter_offload

    module = engine.module
    engine.destroy()
    engine.optimizer = engine.lr_scheduler = None
    # ZeRO-3 pushes the engine's module onto a module-global stack at set-up and never pops
    # it (destroy() neither): without this, the module, its partitions and, through each
    # parameter's _z3_optimizer, the optimizer state stay alive for the whole process.
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    del module
    gc.collect()
    get_accelerator().empty_cache()


def current_lr(engine: Any) -> float:
    return float(engine.get_lr()[0])


# ----------------------------------------------------------------------------- step plans


@dataclass(frozen=True)
class StepPlan:
    """How many micro-steps a stage runs; identical on every rank by construction."""

    micro_per_epoch: int
    total_micro: int
    grad_accum: int

    @property
    def total_optimizer_steps(self) -> int:
        return math.ceil(self.total_micro / self.grad_accum)


def plan_steps(
    n: int, micro_batch: int, world: int, epochs: float, grad_accum: int, max_steps: int | None
) -> StepPlan:
    # Whole optimizer steps per epoch (see batching.train_batches): ceil(n / global batch).
    per_epoch = grad_accum * math.ceil(n / (micro_batch * world * grad_accum))
    total = max(1, math.ceil(per_epoch * epochs))
    # Finish on an optimizer-step boundary so no accumulated gradient is left behind.
    total = math.ceil(total / grad_accum) * grad_accum
    if max_steps is not None:
        total = min(total, max_steps * grad_accum)
    return StepPlan(per_epoch, total, grad_accum)


def micro_batches(
    n: int, micro_batch: int, rank: int, world: int, seed: int, plan: StepPlan, start: int = 0
) -> Iterator[tuple[int, int, list[int]]]:
    """(micro index, epoch, example indices) for every micro-step of the plan from ``start``
    on, reshuffled each epoch; resuming at ``start`` yields exactly what an uninterrupted run
    would have yielded from there (the order is a pure function of seed and epoch)."""
    epoch = start // plan.micro_per_epoch
    micro = epoch * plan.micro_per_epoch
    while micro < plan.total_micro:
        for batch in train_batches(n, micro_batch, rank, world, seed + epoch, plan.grad_accum):
            if micro == plan.total_micro:
                return
            if micro >= start:
                yield micro, epoch, batch
            micro += 1
        epoch += 1


def progress(total: int, desc: str, ctx: parallel.ParallelContext, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not (enabled and ctx.is_main), dynamic_ncols=True)


# ----------------------------------------------------------------------------- forward helpers


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without stalling the host: on an accelerator it is staged
    in pinned memory and copied asynchronously (ordered on the stream before its use)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def forward_tokens(
    engine: Any,
    views: TokenizedViews,
    indices: Sequence[int] | Tensor,
    device: torch.device,
    lang_ids: Tensor | None = None,
) -> Tensor:
    """Label logits ``[B, C]`` (float32) of the views at ``indices`` with ONE forward,
    padded to the longest of them. ``lang_ids`` ``[B]`` (on ``device``): each view's row of
    the scorer's label-word table (cloze / mT5 verbalizers differ per language; the
    classification head ignores it)."""
    ids, mask = views.batch(indices)  # [B, L] each, host
    ids, mask = to_device(ids, device), to_device(mask, device)
    if lang_ids is None:
        return engine(ids, mask).float()
    return engine(ids, mask, lang_ids).float()


def cross_entropy_step(
    engine: Any,
    views: TokenizedViews,
    indices: Sequence[int] | Tensor,
    labels: Tensor,
    device: torch.device,
    lang_ids: Tensor | None = None,
) -> Tensor:
    """One micro-step of cross-entropy on the views at ``indices`` with ``labels`` ``[B]``."""
    logits = forward_tokens(engine, views, indices, device, lang_ids)  # [B, C]
    loss = F.cross_entropy(logits, to_device(labels, device))
    engine.backward(loss)
    engine.step()
    return loss.detach()


@torch.no_grad()
def predict_probs(
    engine: Any,
    views: TokenizedViews,
    ctx: parallel.ParallelContext,
    batch_size: int,
    desc: str,
    show_progress: bool,
    lang_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Label distributions for THIS rank's share of ``views``.

    Views are dealt round-robin across ranks, each rank's sorted by token count (batches
    pad little), and every rank runs the same number of forwards (dummy views fill the tail
    and are dropped). ``lang_ids`` ``[V]`` (host): view v's row of the label-word table (see
    ``forward_tokens``). The distributions stay on the device until the end (one copy to the
    host, not one per batch). Returns (global view indices ``[V_local]`` long, probabilities
    ``[V_local, C]`` float32), on the host.
    """
    module = getattr(engine, "module", engine)  # DeepSpeed's engine.training is not kept
    was_training = module.training
    engine.eval()
    batches = view_batches(len(views), batch_size, ctx.rank, ctx.world_size,
                           views.lengths.tolist())  # fmt: skip
    out: list[Tensor] = []
    with progress(len(batches), desc, ctx, show_progress) as bar:
        for b, (indices, _) in enumerate(batches):
            poll_stop(b, STOP_POLL_BATCHES, ctx, desc)
            langs = None
            if lang_ids is not None:
                langs = to_device(lang_ids[torch.as_tensor(indices)], ctx.device)
            logits = forward_tokens(engine, views, indices, ctx.device, langs)
            out.append(torch.softmax(logits, dim=-1))  # [b, C] on the device
            bar.update(1)
    engine.train(was_training)
    keep = torch.tensor([v for _, valid in batches for v in valid], dtype=torch.bool)
    idx = torch.tensor([i for indices, _ in batches for i in indices], dtype=torch.long)
    return idx[keep], torch.cat(out).cpu()[keep]


# ----------------------------------------------------------------------------- checkpoints/export


def _full_param(param: Tensor, ctx: parallel.ParallelContext) -> Tensor:
    """The whole fp32 value of a ZeRO-3 parameter on every rank (collective). Trainable
    ones come from the optimizer's fp32 partitions (``safe_get_full_fp32_param``): the plain
    parameter gather would send autocast's Linear weights in bf16 (their ``comm_dtype``) and
    round away the very updates that must be exported."""
    from deepspeed.runtime.torch_autocast import get_comm_dtype
    from deepspeed.utils import safe_get_full_fp32_param

    if param.requires_grad:
        full = safe_get_full_fp32_param(param)
        if full is not None:
            return full
    if get_comm_dtype(param) != param.ds_tensor.dtype:  # frozen, gathered at low precision
        return parallel.all_gather_partitions(param.ds_tensor, param.ds_numel, ctx).view(
            param.ds_shape
        )
    with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
        return param.data.clone()


def rank0_state_dict(
    engine: Any, ctx: parallel.ParallelContext, names: Sequence[str] | None = None
) -> dict[str, Tensor] | None:
    """The wrapped LabelScorer's full fp32 weights (the master: parameters are fp32, see
    ``load_for_stage``) as CPU tensors on rank 0, None on the others; ``names`` restricts it
    to those state-dict keys. ZeRO-3 gathers one parameter at a time (every rank takes part;
    only rank 0 keeps a copy, so a node holds one CPU copy of the model, not one per GPU);
    ZeRO 0-2 copy rank 0's replica, no communication."""
    state = engine.module.state_dict(keep_vars=True)
    zero3 = zero_stage(engine.config) == 3
    out: dict[str, Tensor] = {}
    first: dict[int, str] = {}  # tied weights appear under several keys: gathered once, by
    for i, (key, value) in enumerate(state.items()):  # every rank (same keys, same order)
        poll_stop(i, STOP_POLL_PARAMS, ctx, "the model export")
        if names is not None and key not in names:
            continue
        if id(value) in first:
            if ctx.is_main:
                out[key] = out[first[id(value)]]
            continue
        first[id(value)] = key
        full = _full_param(value, ctx) if zero3 and hasattr(value, "ds_id") else value.detach()
        if ctx.is_main:
            out[key] = full.to("cpu", copy=True)
        del full
    return out if ctx.is_main else None


def trainable_names(engine: Any) -> list[str]:
    """State-dict keys of the parameters the optimizer updates (tied ones once)."""
    return [n for n, p in engine.module.named_parameters() if p.requires_grad]


def export_hf(
    engine: Any,
    tokenizer: Any,
    out_dir: Path,
    ctx: parallel.ParallelContext,
    extra: Callable[[Path], None] | None = None,
) -> dict[str, Tensor] | None:
    """Save the model as a plain Hugging Face folder (``from_pretrained`` loads it without
    this project), atomically: written to a temp folder by rank 0, then renamed. Returns the
    exported fp32 weights on rank 0 (None elsewhere) for the parameter-change report."""
    state = rank0_state_dict(engine, ctx)  # collective under ZeRO-3: every rank takes part
    if ctx.is_main:
        hf_state = {k.removeprefix("hf_model."): v for k, v in state.items()}
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
        engine.module.hf_model.save_pretrained(tmp, state_dict=hf_state)
        tokenizer.save_pretrained(tmp)
        if extra is not None:  # e.g. the config that made the model, inside the same rename
            extra(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            _rmtree(old)
        else:
            os.rename(tmp, out_dir)
    parallel.barrier(ctx)
    return state


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
