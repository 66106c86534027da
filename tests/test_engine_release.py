"""An engine that is replaced (stage 0's, or stage 2's when the guard keeps an earlier model)
is freed: module, ZeRO partitions and optimizer state, under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import pytest

from _dist_helpers import TINY_ENGINE, run_code

CODE = (
    TINY_ENGINE
    + """
import gc, pathlib, sys, weakref
from alsace_ds import parallel
from alsace_ds.engine.trainer import release_engine

ctx = parallel.init_distributed(60)
for stage in (2, 3):
    engine, tok, scorer = tiny_engine(pathlib.Path(sys.argv[1]) / f"zero{stage}", stage)
    module, optimizer = weakref.ref(scorer), weakref.ref(engine.optimizer)
    del scorer
    release_engine(engine)
    del engine
    gc.collect()
    print(f"zero{stage}: module freed {module() is None}, optimizer freed {optimizer() is None}")
parallel.shutdown()
"""
)


@pytest.mark.launch
def test_release_engine_frees_module_and_optimizer(tmp_path):
    res = run_code(CODE, str(tmp_path / "model"))
    assert res.returncode == 0, res.output[-6000:]
    for stage in (2, 3):
        assert f"zero{stage}: module freed True, optimizer freed True" in res.output, res.output
