"""An engine that is replaced (stage 0's, or stage 2's when the guard keeps an earlier model)
is freed: module, ZeRO partitions and optimizer state, under ZeRO-2 and ZeRO-3."""

from __future__ import annotations

from _dist_helpers import run_code

CODE = """
import gc, pathlib, sys, weakref
from alsace_ds import parallel
from alsace_ds.models.tiny import build_tiny_model
from alsace_ds.engine.trainer import build_engine, load_for_stage, release_engine

ctx = parallel.init_distributed(60)
path = build_tiny_model(pathlib.Path(sys.argv[1]), "xlmr", ["a", "b", "c"], ["x", "y"])
for stage in (2, 3):
    ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
          "gradient_accumulation_steps": 1, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
    scorer, tok, _ = load_for_stage("xlmr", str(path), 2, None, None, ds)
    engine = build_engine(scorer, ds, 1e-3, 0.0, 10, 0)
    module, optimizer = weakref.ref(scorer), weakref.ref(engine.optimizer)
    del scorer
    release_engine(engine)
    del engine
    gc.collect()
    print(f"zero{stage}: module freed {module() is None}, optimizer freed {optimizer() is None}")
parallel.shutdown()
"""


def test_release_engine_frees_module_and_optimizer(tmp_path):
    res = run_code(CODE, str(tmp_path / "model"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for stage in (2, 3):
        assert f"zero{stage}: module freed True, optimizer freed True" in res.stdout, res.stdout
