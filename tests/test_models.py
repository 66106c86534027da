"""Model adapters (alsace_ds.models) on tiny local models."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import Unigram
from transformers import PreTrainedTokenizerFast

from alsace_ds.models import (
    MT5LabelWords,
    XLMRClassifier,
    encode_views,
    label_word_token_ids,
    load_scorer,
)
from alsace_ds.tiny import build_tiny_model, build_word_tokenizer

WORDS = ["the cat sat on the mat .", "a dog ran far away", "hello world !", "is it true ?"]
LABEL_NAMES = ["entailment", "neutral", "contradiction"]
LABEL_WORDS = ["yes", "maybe", "no"]
TEXTS = ["the cat sat on the mat .", "hello world", "a dog ran far away on the mat !"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "xlmr": build_tiny_model(root / "xlmr", "xlmr", WORDS, LABEL_NAMES, seed=1),
        "mt5": build_tiny_model(
            root / "mt5", "mt5", WORDS, LABEL_NAMES, label_words=LABEL_WORDS, seed=1
        ),
    }


def _load(family, path, **kw):
    words = LABEL_WORDS if family == "mt5" else None
    return load_scorer(family, path, 3, label_words=words, **kw)


@pytest.mark.parametrize("family", ["xlmr", "mt5"])
def test_logits_shape_and_type(tiny_dirs, family):
    scorer, tok, warnings = _load(family, tiny_dirs[family])
    assert warnings == []
    assert isinstance(scorer, XLMRClassifier if family == "xlmr" else MT5LabelWords)
    assert scorer.family == family and scorer.num_labels == 3
    assert not scorer.training and not scorer.hf_model.training
    batch = encode_views(tok, TEXTS, 32)
    logits = scorer(**batch)
    assert logits.shape == (3, 3) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_mt5_logits_match_full_model_and_generate(tiny_dirs):
    scorer, tok, _ = _load("mt5", tiny_dirs["mt5"])
    ids = [tok.convert_tokens_to_ids(w) for w in LABEL_WORDS]
    assert scorer.label_token_ids.tolist() == ids
    # Derived from the tokenizer, so not part of the state dict / checkpoints.
    assert "label_token_ids" not in scorer.state_dict()
    batch = encode_views(tok, TEXTS, 32)
    with torch.no_grad():
        got = scorer(**batch)
        full = scorer.hf_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            decoder_input_ids=torch.zeros(3, 1, dtype=torch.long),  # start token = pad = 0
        ).logits  # [B, 1, V]
        gen = scorer.hf_model.generate(
            **batch,
            max_new_tokens=1,
            do_sample=False,
            output_logits=True,
            output_scores=True,
            return_dict_in_generate=True,
        )
    torch.testing.assert_close(got, full[:, 0, ids], rtol=0, atol=1e-6)
    # .logits are the raw (unprocessed) step-0 logits.
    torch.testing.assert_close(got, gen.logits[0][:, ids], rtol=0, atol=1e-5)
    torch.testing.assert_close(got, gen.scores[0][:, ids], rtol=0, atol=1e-5)


def test_xlmr_logits_match_full_model(tiny_dirs):
    scorer, tok, _ = _load("xlmr", tiny_dirs["xlmr"])
    batch = encode_views(tok, TEXTS, 32)
    with torch.no_grad():
        ref = scorer.hf_model(**batch).logits
        torch.testing.assert_close(scorer(**batch), ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["xlmr", "mt5"])
def test_gradients_reach_encoder_embeddings(tiny_dirs, family):
    scorer, tok, _ = _load(family, tiny_dirs[family])
    scorer.train()
    batch = encode_views(tok, TEXTS[:2], 32)
    loss = torch.nn.functional.cross_entropy(scorer(**batch), torch.tensor([0, 2]))
    loss.backward()
    emb = scorer.hf_model.get_input_embeddings().weight
    assert emb.grad is not None
    used = batch["input_ids"][batch["attention_mask"].bool()].unique()
    assert (emb.grad[used].abs().sum(-1) > 0).all()
    # A word that appears in no input gets no gradient (mT5's decoder only sees id 0).
    unused = tok.convert_tokens_to_ids("true")
    assert unused not in used.tolist()
    assert torch.count_nonzero(emb.grad[unused]) == 0


@pytest.mark.parametrize("family", ["xlmr", "mt5"])
def test_padding_invariance(tiny_dirs, family):
    scorer, tok, _ = _load(family, tiny_dirs[family])
    with torch.no_grad():
        alone = scorer(**encode_views(tok, [TEXTS[1]], 32))
        batch = encode_views(tok, TEXTS, 32)
        assert batch["attention_mask"][1].sum() < batch["attention_mask"].shape[1]  # padded
        padded = scorer(**batch)
    torch.testing.assert_close(padded[1:2], alone, rtol=0, atol=1e-5)


def test_label_word_errors_and_warnings():
    tok = build_word_tokenizer(WORDS + LABEL_WORDS, "mt5")
    ids, warnings = label_word_token_ids(tok, ["yes", "no"])
    assert ids == [tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")]
    assert warnings == []

    ids, warnings = label_word_token_ids(tok, ["yes", "no way"])
    # "no way": "way" is unknown but only the first piece is used.
    assert ids == [tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")]
    assert warnings == ["label word 'no way' is split into 2 pieces; using the first piece 'no'"]

    with pytest.raises(ValueError, match="'zebra'.*unknown token"):
        label_word_token_ids(tok, ["yes", "zebra"])
    with pytest.raises(ValueError, match="'no' and 'no way' share the first token 'no'"):
        label_word_token_ids(tok, ["no", "no way"])
    with pytest.raises(ValueError, match="empty"):
        label_word_token_ids(tok, ["yes", "  "])
    with pytest.raises(ValueError, match="special token"):
        label_word_token_ids(tok, ["yes", "</s>"])


def test_label_word_skips_sentencepiece_blank_piece():
    """Real mT5 may emit a lone '▁' before a word; it is skipped (else all labels share it)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), ("▁yes", -1.0)]
    vocab += [("xy", -1.0), ("z", -1.0)]
    sp = Tokenizer(Unigram(vocab, unk_id=2))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=sp, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    assert tok.convert_ids_to_tokens(tok("xyz", add_special_tokens=False)["input_ids"]) == [
        "▁", "xy", "z"
    ]  # fmt: skip
    ids, warnings = label_word_token_ids(tok, ["yes", "xyz"])
    assert ids == [4, 5]
    assert warnings == [
        "label word 'xyz' is split into 3 pieces; using the first piece 'xy' "
        "(after skipping 1 blank piece(s))"
    ]


def test_load_scorer_mt5_label_word_errors(tiny_dirs):
    with pytest.raises(ValueError, match="needs label_words"):
        load_scorer("mt5", tiny_dirs["mt5"], 3)
    with pytest.raises(ValueError, match="2 label_words"):
        load_scorer("mt5", tiny_dirs["mt5"], 3, label_words=["yes", "no"])
    with pytest.raises(ValueError, match="'zebra'"):
        load_scorer("mt5", tiny_dirs["mt5"], 3, label_words=["yes", "no", "zebra"])
    _, _, warnings = load_scorer("mt5", tiny_dirs["mt5"], 2, label_words=["yes", "no far"])
    assert warnings == ["label word 'no far' is split into 2 pieces; using the first piece 'no'"]


def test_load_scorer_argument_errors(tiny_dirs):
    with pytest.raises(ValueError, match="unknown model family 'bert'"):
        load_scorer("bert", tiny_dirs["xlmr"], 3)
    with pytest.raises(ValueError, match="num_labels"):
        load_scorer("xlmr", tiny_dirs["xlmr"], 0)
    with pytest.raises(ValueError, match="dropout"):
        load_scorer("xlmr", tiny_dirs["xlmr"], 3, dropout=1.5)
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_scorer("mt5", tiny_dirs["xlmr"], 3, label_words=LABEL_WORDS)
    _, _, warnings = load_scorer("xlmr", tiny_dirs["xlmr"], 3, label_words=LABEL_WORDS)
    assert warnings == ["label_words are ignored for family 'xlmr' (classification head)"]


def test_dropout_override(tiny_dirs):
    xs, _, _ = load_scorer("xlmr", tiny_dirs["xlmr"], 3, dropout=0.25)
    cfg = xs.hf_model.config
    assert cfg.hidden_dropout_prob == 0.25 and cfg.attention_probs_dropout_prob == 0.25
    assert xs.hf_model.roberta.embeddings.dropout.p == 0.25
    ms, _, _ = load_scorer("mt5", tiny_dirs["mt5"], 3, label_words=LABEL_WORDS, dropout=0.0)
    assert ms.hf_model.config.dropout_rate == 0.0
    assert ms.hf_model.encoder.dropout.p == 0.0
    # Without the override the saved defaults stay.
    ds, _, _ = load_scorer("xlmr", tiny_dirs["xlmr"], 3)
    assert ds.hf_model.config.hidden_dropout_prob == 0.1


def test_xlmr_other_head_size_and_save_roundtrip(tiny_dirs, tmp_path):
    saved_emb = load_scorer("xlmr", tiny_dirs["xlmr"], 3)[0].hf_model.get_input_embeddings()
    scorer, tok, _ = load_scorer("xlmr", tiny_dirs["xlmr"], 5)
    assert scorer.num_labels == 5
    assert scorer.hf_model.classifier.out_proj.weight.shape == (5, 64)
    assert scorer(**encode_views(tok, TEXTS, 32)).shape == (3, 5)
    assert scorer.hf_model.config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    # The encoder still comes from the checkpoint.
    assert torch.equal(scorer.hf_model.get_input_embeddings().weight, saved_emb.weight)

    # save_pretrained -> reload with the same head size restores the head exactly.
    scorer.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    again, _, _ = load_scorer("xlmr", tmp_path / "ckpt", 5)
    for (k, a), (_, b) in zip(scorer.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_mt5_save_roundtrip_keeps_untied_head(tiny_dirs, tmp_path):
    scorer, tok, _ = _load("mt5", tiny_dirs["mt5"])
    with torch.no_grad():
        scorer.hf_model.lm_head.weight[:, 0] += 1.0  # make the saved head distinguishable
    scorer.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    again, tok2, _ = _load("mt5", tmp_path / "ckpt")
    hf = again.hf_model
    assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    for (k, a), (_, b) in zip(scorer.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    batch = encode_views(tok2, TEXTS, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch), scorer(**batch), rtol=0, atol=0)


def test_dtype(tiny_dirs):
    scorer, tok, _ = _load("mt5", tiny_dirs["mt5"], dtype=torch.bfloat16)
    assert scorer.hf_model.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = scorer(**encode_views(tok, TEXTS[:1], 32))
    assert logits.dtype == torch.float32  # scorers always hand back fp32 logits


def test_encode_views_singles_pairs_and_errors():
    tok = build_word_tokenizer(WORDS, "xlmr")
    i = tok.convert_tokens_to_ids
    singles = encode_views(tok, ["hello world", "the cat sat on the mat ."], 6)
    assert set(singles) == {"input_ids", "attention_mask"}
    assert singles["input_ids"].tolist() == [
        [0, i("hello"), i("world"), 2, 1, 1],
        [0, i("the"), i("cat"), i("sat"), i("on"), 2],  # truncated to 6, keeps </s>
    ]
    assert singles["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]

    pairs = encode_views(tok, [("hello world", "a dog"), ["the cat", "dog"]], 32)
    assert pairs["input_ids"].tolist() == [
        [0, i("hello"), i("world"), 2, 2, i("a"), i("dog"), 2],
        [0, i("the"), i("cat"), 2, 2, i("dog"), 2, 1],
    ]
    assert pairs["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]

    # longest_first trims the longer side first.
    long_pair = encode_views(tok, [("the cat sat on the mat", "a dog")], 9)
    assert long_pair["input_ids"].tolist() == [
        [0, i("the"), i("cat"), i("sat"), 2, 2, i("a"), i("dog"), 2]
    ]

    with pytest.raises(ValueError, match="mix"):
        encode_views(tok, ["hello", ("a", "b")], 8)
    with pytest.raises(ValueError, match="empty"):
        encode_views(tok, [], 8)
    with pytest.raises(ValueError, match="pair"):
        encode_views(tok, [("a", "b", "c")], 8)
    with pytest.raises(ValueError, match="str"):
        encode_views(tok, [3], 8)


def test_encode_views_mt5_pairs():
    tok = build_word_tokenizer(WORDS, "mt5")
    i = tok.convert_tokens_to_ids
    enc = encode_views(tok, [("hello world", "a dog")], 16)
    assert enc["input_ids"].tolist() == [[i("hello"), i("world"), 1, i("a"), i("dog"), 1]]
