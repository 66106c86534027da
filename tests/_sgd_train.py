"""The real entry point (``alsace_ds/train.py``) with one change, for tests that compare
gradients: the optimizer built with learning rate ``$ALSACE_TEST_SGD_LR`` is plain SGD (no
momentum, no weight decay), so each weight moves by exactly ``-lr x`` its gradient. (AdamW,
the product's optimizer, moves every weight by ~``lr x sign(g)`` at its first step and is
invariant to the gradient's scale: a gradient off by a factor of 2 leaves its updates
unchanged.) Every other optimizer, e.g. stage 0's, stays the product's AdamW.

Run exactly like ``train.py``: ``deepspeed --num_gpus N tests/_sgd_train.py key=value ...``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from alsace_ds.engine import trainer  # noqa: E402

SGD_LR = float(os.environ["ALSACE_TEST_SGD_LR"])
_product_optimizer = trainer.make_optimizer


def make_optimizer(module: torch.nn.Module, lr: float, weight_decay: float):
    if lr != SGD_LR:
        return _product_optimizer(module, lr, weight_decay)
    return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)


trainer.make_optimizer = make_optimizer  # build_engine looks it up at call time

if __name__ == "__main__":
    from alsace_ds.train import main

    sys.exit(main())
