"""TensorBoard logging from rank 0 only (logging is not a collective, so this branch is safe)."""

from __future__ import annotations

from pathlib import Path


class TBLogger:
    """Scalars to ``<run_dir>/tb``; a no-op on every rank but the main one, or when disabled."""

    def __init__(self, log_dir: str | Path, enabled: bool) -> None:
        self._writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if self._writer is not None and value is not None:
            self._writer.add_scalar(tag, float(value), step)

    def scalars(self, prefix: str, values: dict[str, float | None], step: int) -> None:
        for key, value in values.items():
            self.scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
