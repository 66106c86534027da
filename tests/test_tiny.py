"""Tiny offline tokenizer/model builder (alsace_ds.models.tiny)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from alsace_ds.models import tiny
from alsace_ds.models.tiny import build_tiny_model, build_word_tokenizer

WORDS = ["the cat sat on the mat .", "a dog ran", "hello world !"]
# sorted unique pieces: ! . a cat dog hello mat on ran sat the world
PIECES = sorted({"!", ".", "a", "cat", "dog", "hello", "mat", "on", "ran", "sat", "the", "world"})
LABELS = ["negative", "positive"]


def _ids(family: str) -> dict[str, int]:
    offset = 5 if family == "xlmr" else 3
    return {w: offset + i for i, w in enumerate(PIECES)}


def test_xlmr_tokenizer_specials_and_templates():
    tok = build_word_tokenizer(WORDS, "xlmr")
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.unk_token_id, tok.mask_token_id) == (3, 4)
    assert tok.cls_token_id == 0 and tok.sep_token_id == 2
    assert len(tok) == 5 + len(PIECES)
    ids = _ids("xlmr")
    assert tok("the cat")["input_ids"] == [0, ids["the"], ids["cat"], 2]
    assert tok("the cat", "a dog")["input_ids"] == [
        0, ids["the"], ids["cat"], 2, 2, ids["a"], ids["dog"], 2
    ]  # fmt: skip
    # No token_type_ids, like XLM-R.
    assert set(tok("the cat", "a dog").keys()) == {"input_ids", "attention_mask"}
    assert tok("zebra cat", add_special_tokens=False)["input_ids"] == [3, ids["cat"]]


def test_mt5_tokenizer_specials_and_templates():
    tok = build_word_tokenizer(WORDS, "mt5")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.bos_token_id is None
    ids = _ids("mt5")
    assert tok("the cat")["input_ids"] == [ids["the"], ids["cat"], 1]
    assert tok("the cat", "a dog")["input_ids"] == [
        ids["the"],
        ids["cat"],
        1,
        ids["a"],
        ids["dog"],
        1,
    ]
    enc = tok(["the cat sat", "a"], padding=True)
    assert enc["input_ids"][1] == [ids["a"], 1, 0, 0]
    assert enc["attention_mask"][1] == [1, 1, 0, 0]


@pytest.mark.parametrize("family", ["xlmr", "mt5"])
def test_round_trip(family):
    tok = build_word_tokenizer(WORDS, family)
    text = "hello world ! the cat sat on the mat ."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    # Punctuation attached to a word is split off by the pre-tokenizer.
    assert tok("cat.", add_special_tokens=False)["input_ids"] == [
        _ids(family)["cat"],
        _ids(family)["."],
    ]


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown model family"):
        build_word_tokenizer(WORDS, "bert")


def _state(path):
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("family", ["xlmr", "mt5"])
def test_determinism(tmp_path, family):
    rng_before = torch.get_rng_state()
    a = build_tiny_model(tmp_path / "a", family, WORDS, LABELS, seed=3)
    b = build_tiny_model(tmp_path / "b", family, WORDS, LABELS, seed=3)
    c = build_tiny_model(tmp_path / "c", family, WORDS, LABELS, seed=4)
    # The caller's global RNG is not consumed.
    assert torch.equal(torch.get_rng_state(), rng_before)
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_atomic_existing_dir(tmp_path):
    out = build_tiny_model(tmp_path / "m", "xlmr", WORDS, LABELS, seed=0)
    before = {n: (out / n).stat().st_mtime_ns for n in os.listdir(out)}
    again = build_tiny_model(tmp_path / "m", "xlmr", WORDS, LABELS, seed=1)
    assert again == out
    assert {n: (out / n).stat().st_mtime_ns for n in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_atomic_lost_race(tmp_path, monkeypatch):
    """Another process creates out_dir between our check and our rename: we keep theirs."""
    real_rename = os.rename
    out = tmp_path / "m"

    def racing_rename(src, dst):
        os.makedirs(dst)
        (out / "winner.txt").write_text("other process")
        return real_rename(src, dst)  # fails: dst is a non-empty directory

    monkeypatch.setattr(tiny.os, "rename", racing_rename)
    got = build_tiny_model(out, "mt5", WORDS, LABELS)
    assert got == out
    assert os.listdir(out) == ["winner.txt"]
    assert sorted(os.listdir(tmp_path)) == ["m"]  # temp dir removed


def test_loads_via_auto_classes_xlmr(tmp_path):
    out = build_tiny_model(tmp_path / "x", "xlmr", WORDS, LABELS, max_length=16, hidden=32)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert tok("the cat")["input_ids"] == [0, _ids("xlmr")["the"], _ids("xlmr")["cat"], 2]
    assert tok.model_max_length == 16
    cfg = model.config
    assert cfg.model_type == "xlm-roberta"
    assert (cfg.num_labels, cfg.id2label, cfg.label2id) == (
        2, {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    )  # fmt: skip
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (1, 0, 2)
    assert cfg.vocab_size == len(tok) and cfg.hidden_size == 32 and cfg.type_vocab_size == 1
    # A full max_length sequence fits the position table (positions start at pad_id + 1).
    ids = torch.full((1, 16), _ids("xlmr")["cat"])
    assert model(input_ids=ids).logits.shape == (1, 2)


def test_loads_via_auto_classes_mt5(tmp_path):
    out = build_tiny_model(
        tmp_path / "m", "mt5", WORDS, LABELS, label_words=["bad", "good"], layers=1, ffn=64
    )
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    cfg = model.config
    assert cfg.model_type == "mt5"
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 0)
    assert (cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers) == (64, 64, 1, 1)
    assert (cfg.num_heads, cfg.d_kv) == (4, 16)
    assert (cfg.id2label, cfg.label2id) == (
        {0: "negative", 1: "positive"},
        {"negative": 0, "positive": 1},
    )
    # Label words are single in-vocab tokens.
    for w in ["bad", "good"]:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id
    # Untied output projection, like google/mt5-*: both tensors saved, different values.
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    assert {"lm_head.weight", "shared.weight"} <= _state(out).keys()
    enc = tok(["the cat"], return_tensors="pt")
    out_logits = model(**enc, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits
    assert out_logits.shape == (1, 1, len(tok))


def test_mt5_label_words_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="label_words"):
        build_tiny_model(tmp_path / "m", "mt5", WORDS, LABELS, label_words=["bad"])
    assert not (tmp_path / "m").exists()
