"""TensorBoard logging from rank 0 only (logging is not a collective, so this branch is safe)."""

from __future__ import annotations

import io
from pathlib import Path


class TBLogger:
    """Scalars and images to ``<run_dir>/tb``; a no-op on every rank but the main one, or
    when disabled."""

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

    def image(self, tag: str, png: str | Path, step: int) -> None:
        """A PNG file as a TensorBoard image (decoded to ``[H, W, 3]`` uint8)."""
        if self._writer is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(Path(png).read_bytes())) as img:
            pixels = np.asarray(img.convert("RGB"))  # [H, W, 3] uint8
        self._writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
