"""What a training stage does after each dev check: keep the best stage-0 model
(:class:`BestKeeper`), or watch distillation for collapse (:class:`DevMonitor`). A callback's
state is part of every checkpoint, so a resumed stage decides exactly as an uninterrupted one."""

from __future__ import annotations

import copy
import typing
from functools import partial
from pathlib import Path
from typing import Any

import torch

from alsace_ds import parallel
from alsace_ds.engine import rundir, signals
from alsace_ds.engine.trainer import export_hf
from alsace_ds.io import atomic_write_json
from alsace_ds.method.guard import Guard, monitor_metrics, monitor_sums
from alsace_ds.recipes.evaluation import DevResult, dev_check
from alsace_ds.recipes.run import Run


class DevCallback(typing.Protocol):
    """Called after each dev check; ``ends_stage`` then says whether the stage stops early.
    Its state goes into every checkpoint."""

    ends_stage: bool

    def __call__(self, engine: Any, tok: Any, dev: DevResult, step: int) -> None: ...
    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


def after_dev(
    run: Run, engine: Any, tok: Any, stage: str, roles, on_dev: DevCallback | None
) -> bool:
    """A dev check and the callback's verdict (True: end the stage). A stop request inside
    the callback restores its state: the check is redone on resume and must count once."""
    dev = dev_check(run, engine, tok, stage, engine.global_steps, roles)
    stop = False
    if dev is not None and on_dev is not None:
        before = on_dev.state()
        try:
            on_dev(engine, tok, dev, engine.global_steps)
        except signals.StopRequested:
            on_dev.restore(before)
            raise
        stop = on_dev.ends_stage
    engine.train()
    return stop


def _made_by(run: Run):
    return partial(rundir.write_provenance, cfg=run.cfg)


class BestKeeper:
    """Keeps the model with the best dev metric seen so far as a Hugging Face folder (atomic
    export) plus ``best.json``; the decision uses all-reduced accuracies, so every rank agrees
    and joins the (collective, under ZeRO-3) export. Never ends the stage early."""

    ends_stage = False

    def __init__(self, run: Run, folder: Path, metric: str) -> None:
        self.run, self.folder = run, folder
        self.metric = metric  # "english" | "average"
        self.best: float | None = None

    @classmethod
    def for_stage0(cls, run: Run) -> BestKeeper | None:
        st = run.cfg.stage0
        if not st.keep_best or run.task.dev is None or not run.cfg.eval.every_epoch:
            return None
        metric = st.best_metric if run.task.english is not None else "average"
        return cls(run, run.run_dir / "stage0" / "best", metric)

    def state(self) -> dict:
        return {"best": self.best}

    def restore(self, state: dict) -> None:
        self.best = state["best"]

    def value(self, summ: dict) -> float:
        if self.metric == "english":
            return float(summ["accuracy"][self.run.task.english])
        return float(summ["averages"]["all"]["accuracy"])

    def __call__(self, engine: Any, tok: Any, dev: DevResult, step: int) -> None:
        value = self.value(dev.summ)
        if self.best is None or value > self.best:
            export_hf(engine, tok, self.folder, self.run.ctx, _made_by(self.run))  # may stop
            self.best = value
            if self.run.ctx.is_main:
                record = {"metric": self.metric, "value": value, "step": step,
                          "dev": dev.summ["accuracy"]}  # fmt: skip
                atomic_write_json(self.folder.parent / "best.json", record)
            self.run.say(f"new best {self.metric} dev accuracy {value:.2f} at step {step}")


class DevMonitor:
    """Distillation's dev checks -> the collapse guard (:mod:`alsace_ds.method.guard`):
    TensorBoard curves, ``distill_guard.json`` (its state, for reading; a resume takes the
    state from the checkpoint), the best healthy model exported to ``distill/best``, and the
    early-stop decision."""

    def __init__(self, run: Run, source: str) -> None:
        d = run.cfg.distill
        self.run, self.source = run, source
        self.guard = Guard(
            d.guard_max_en_drop, d.guard_min_entropy_ratio, d.guard_patience,
            min_agreement=d.guard_min_agreement,
        )  # fmt: skip
        self.path = run.run_dir / "distill_guard.json"
        self.best_dir = run.run_dir / "distill" / "best"
        self.reference: torch.Tensor | None = None  # [N, T] predictions at the start
        self.stopped_early = False

    def state(self) -> dict:
        """The guard's history, bad-check counter, best check and start predictions."""
        ref = None if self.reference is None else self.reference.clone()
        return {"guard": copy.deepcopy(self.guard.state()), "reference": ref,
                "stopped_early": self.stopped_early}  # fmt: skip

    def restore(self, state: dict) -> None:
        self.guard.load(copy.deepcopy(state["guard"]))
        self.reference = state["reference"]
        self.stopped_early = state["stopped_early"]

    @property
    def ends_stage(self) -> bool:
        """The guard asked to stop and ``distill.guard`` lets it."""
        return self.stopped_early and self.run.cfg.distill.guard

    def __call__(self, engine: Any, tok: Any, dev: DevResult, step: int) -> None:
        run, task = self.run, self.run.task
        T = len(task.languages)
        sums = monitor_sums(
            dev.probs, dev.idx // T, dev.idx % T, len(task.dev), T, task.dev.labels()
        )  # fmt: skip
        sums = {k: parallel.all_reduce_sum(v, run.ctx) for k, v in sums.items()}
        metrics, pred = monitor_metrics(sums, task.languages, task.english, self.reference)
        if self.reference is None:
            self.reference = pred
        verdict = self.guard.check(metrics, step)
        self._log(metrics, verdict, step)
        if verdict["improved"] and step > 0 and run.cfg.distill.keep_best:
            export_hf(engine, tok, self.best_dir, run.ctx, _made_by(run))
        for p in verdict["problems"]:
            run.say(f"GUARD step {step}: {p}")
        self.stopped_early = verdict["stop"]
        if run.ctx.is_main:
            state = {"guard": self.guard.state(), "reference": self.reference.tolist()}
            atomic_write_json(self.path, state)  # for people and tools; resume reads the ckpt
        if verdict["stop"]:
            run.say(f"GUARD: stopping distill early at step {step}")

    def _log(self, m: dict, verdict: dict, step: int) -> None:
        tb = self.run.tb
        if "english_accuracy" in m:
            tb.scalar("distill/guard/english_dev_accuracy", m["english_accuracy"], step)
        tb.scalars("distill/guard/mean_prediction_entropy_bits",
                   m["mean_prediction_entropy_bits"], step)  # fmt: skip
        tb.scalars("distill/guard/agreement_with_start", m["agreement_with_start"], step)
        tb.scalar("distill/guard/consistency", m["consistency"], step)
        tb.scalar("distill/guard/healthy", float(verdict["healthy"]), step)

    def best_source(self, last_step: int) -> str | None:
        """The folder of the best healthy check when it is not the last model; None = last."""
        best = self.guard.best_step
        if not self.run.cfg.distill.keep_best or best is None or best == last_step:
            return None
        return self.source if best == 0 else str(self.best_dir)

    def summary(self, final_from: str) -> dict:
        return {
            "best_step": self.guard.best_step,
            "stopped_early": self.stopped_early,
            "final_from": final_from,
            "checks": self.guard.history,
        }
