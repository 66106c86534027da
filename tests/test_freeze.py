"""model.freeze_embeddings: the input word embeddings get no gradient and no optimizer state."""

from __future__ import annotations

from alsace_ds.engine.trainer import load_for_stage, make_optimizer
from alsace_ds.models.tiny import build_tiny_model


def test_frozen_embeddings_are_left_out_of_the_optimizer(tmp_path):
    model = build_tiny_model(tmp_path / "m", "xlmr", ["a", "b", "c"], ["x", "y"])
    ds = {"zero_optimization": {"stage": 2}}
    scorer, _, _ = load_for_stage("xlmr", str(model), 2, None, None, ds,
                                  freeze_embeddings=True)  # fmt: skip
    emb = scorer.hf_model.get_input_embeddings().weight
    assert not emb.requires_grad
    opt = make_optimizer(scorer, 1e-3, 0.01)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(emb) not in in_opt
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    assert len(in_opt) == len(trainable) and trainable
    free, _, _ = load_for_stage("xlmr", str(model), 2, None, None, ds)
    assert free.hf_model.get_input_embeddings().weight.requires_grad
