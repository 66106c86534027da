"""What every stage of a recipe reads, fixed for the whole run: the config, the task, the
parallel context (its view groups built once, at start-up), the run directory and the
TensorBoard writer. The one piece of run state that changes, when to commit and stop, is
:class:`alsace_ds.recipes.loop.Commits`, handed to the training stages explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alsace_ds import parallel
from alsace_ds.config import Config, DistillConfig, Stage0Config
from alsace_ds.data.corpus import DataError, ParallelCorpus
from alsace_ds.data.tasks import TaskData
from alsace_ds.data.tokens import (
    TaskTokens,
    TokenizedCorpus,
    mask_count_problems,
    tokenize_corpora,
    tokenizer_fingerprint,
)
from alsace_ds.engine import checkpoint, rundir
from alsace_ds.engine.ds_config import build_ds_config
from alsace_ds.engine.schedules import warmup_steps
from alsace_ds.engine.trainer import build_engine, load_for_stage
from alsace_ds.reporting.tb import TBLogger


@dataclass(frozen=True)
class Run:
    cfg: Config
    task: TaskData
    ctx: parallel.ParallelContext
    run_dir: Path
    tb: TBLogger
    tokens: TaskTokens  # every corpus's views as token ids (tokenized once, cached)

    def say(self, msg: str) -> None:
        if self.ctx.is_main:
            print(f"[alsace_ds] {msg}", flush=True)


def set_matmul_precision(cfg: Config, ctx: parallel.ParallelContext) -> None:
    """fp32 on an NVIDIA GPU: TF32 matmuls unless ``model.tf32`` is off (fp32 sums, 10-bit
    mantissa products); bf16 runs compute in bf16 already, CPUs have no TF32."""
    if ctx.device.type == "cuda" and cfg.model.resolved_dtype == "fp32" and cfg.model.tf32:
        import torch

        torch.set_float32_matmul_precision("high")


def build_tokens(
    cfg: Config, task: TaskData, ctx: parallel.ParallelContext, run_dir: Path
) -> TaskTokens:
    """Every corpus tokenized once with the tokenizer of the model the run starts from, in
    ``<run_dir>/tokens/`` (reused when views, tokenizer and ``max_length`` are unchanged).
    Rank 0 builds, checks and writes the cache, then every other rank reads it. A cloze
    head's views must each hold the mask token once: every view that does not is named
    before any training (DataError on rank 0, PeerError elsewhere)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task.model_source)
    langs = list(task.languages)
    train = task.train if cfg.stage0.enabled else None  # no stage 0: no English training
    specs = [("train", train, [task.train_language]), ("unlabeled", task.unlabeled, langs),
             ("dev", task.dev, langs), ("test", task.test, langs)]  # fmt: skip
    cache, max_length = run_dir / "tokens", cfg.model.max_length
    fp = tokenizer_fingerprint(tok)  # hashes the whole vocabulary: once

    def check(toks: TokenizedCorpus, corpus: ParallelCorpus) -> None:
        if task.head != "cloze":
            return
        problems = mask_count_problems(toks, corpus, int(tok.mask_token_id))
        if problems:
            raise DataError(
                corpus.path,
                [f"a cloze input must contain the mask token exactly once: it was truncated "
                 f"away (raise model.max_length={max_length}) or the text itself contains it",
                 *problems],
            )  # fmt: skip

    mine: dict = {}
    parallel.decide(
        lambda: mine.update(tokenize_corpora(specs, tok, max_length, cache, check, tok_fp=fp)),
        ctx,
    )
    if not ctx.is_main:  # the cache rank 0 wrote (a node without it tokenizes for itself)
        mine = tokenize_corpora(specs, tok, max_length, cache, write=False, tok_fp=fp)
    return TaskTokens(fp, **mine)


def stage_config(cfg: Config, stage: str) -> Stage0Config | DistillConfig:
    return cfg.stage0 if stage == "stage0" else cfg.distill


def launch_facts(cfg: Config, stage: str, world_size: int) -> dict:
    """The launch a stage's checkpoint is only valid for (ZeRO keeps state per rank)."""
    zero = int(
        build_ds_config(cfg, stage_config(cfg, stage), world_size)["zero_optimization"]["stage"]
    )
    view = 1 if stage == "stage0" else int(cfg.distill.view_parallel_size)
    return rundir.launch_facts(world_size, view, zero)


def make_engine(run: Run, stage: str, source: str, total: int) -> tuple[Any, Any, list[str]]:
    """The stage's ZeRO engine around the model at ``source`` (a Hub name or a folder) with
    the stage's optimizer and ``total``-step schedule: (engine, tokenizer, load warnings)."""
    cfg, task = run.cfg, run.task
    st = stage_config(cfg, stage)
    ds_cfg = build_ds_config(cfg, st, run.ctx.world_size)
    scorer, tok, warnings = load_for_stage(
        cfg.model.family, source, task.num_labels, task.label_words, cfg.model.dropout,
        ds_cfg, head=task.head, languages=task.prompt_languages,
        freeze_embeddings=cfg.model.freeze_embeddings,
    )  # fmt: skip
    run.tokens.check_tokenizer(tok, source)  # the views were tokenized with stage 0's
    warm = warmup_steps(total, st.warmup_ratio)
    engine = build_engine(scorer, ds_cfg, st.lr, st.weight_decay, total, warm, st.schedule)
    return engine, tok, warnings


def open_run_dir(cfg: Config, ctx: parallel.ParallelContext) -> rundir.RunLock | None:
    """Before any model is loaded: take the run directory (rank 0 holds its lock for the
    job) and refuse, with every reason, to reuse outputs another setup made."""
    lock = rundir.RunLock(Path(cfg.run.output_dir)) if ctx.is_main else None
    parallel.decide(lambda: lock.acquire(say=lambda m: print(f"[alsace_ds] {m}", flush=True)), ctx)
    facts = {stage: launch_facts(cfg, stage, ctx.world_size) for stage in rundir.STAGES}
    try:
        rundir.check_reuse(cfg, facts, ctx)
        for stage in rundir.loaded_stages(Path(cfg.run.output_dir)):  # shards intact, by name
            folder = Path(cfg.run.output_dir) / "checkpoints" / stage
            tag = parallel.decide(lambda f=folder: checkpoint.read_latest(f), ctx)
            if tag is not None:
                checkpoint.verify(folder, tag, ctx)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock
