"""Model adapters (alsace_ds.models.scorers) on tiny local models."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import Unigram
from transformers import PreTrainedTokenizerFast

from alsace_ds.data.tokens import encode_views
from alsace_ds.models.scorers import (
    HEADS,
    MT5LabelWords,
    XLMRClassifier,
    XLMRCloze,
    label_word_token_ids,
    load_scorer,
)
from alsace_ds.models.tiny import build_tiny_model, build_word_tokenizer

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
    assert scorer.label_token_ids.tolist() == [ids]  # one row, shared by every language
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
    """The classifier's logits against two computations that do not go through load_scorer:
    the checkpoint loaded on its own by transformers (its sequence-classification forward),
    and the RoBERTa head by hand (dense -> tanh -> out_proj on the <s> state) on the bare
    encoder's output, with the head's weights read from the saved file."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_dirs["xlmr"]
    scorer, tok, _ = _load("xlmr", path)
    with torch.no_grad():
        got = scorer(**encode_views(tok, TEXTS, 32))
    ref_tok = AutoTokenizer.from_pretrained(path)
    enc = ref_tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        full = AutoModelForSequenceClassification.from_pretrained(path).eval()(**enc).logits
        hidden = AutoModel.from_pretrained(path, add_pooling_layer=False).eval()(**enc)
        w = load_file(path / "model.safetensors")
        cls = hidden.last_hidden_state[:, 0]  # the <s> token
        dense = torch.tanh(cls @ w["classifier.dense.weight"].T + w["classifier.dense.bias"])
        by_hand = dense @ w["classifier.out_proj.weight"].T + w["classifier.out_proj.bias"]
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-5)
    assert float((got[0] - got[1]).abs().max()) > 1e-4  # texts differ far beyond the tolerance


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


def test_views_have_one_type():
    """The views are tokenized as the corpus defines them: one definition (data/corpus.py)."""
    from alsace_ds.data import corpus, tokens

    assert tokens.View is corpus.View


def _export(scorer, tok, out_dir):
    """Save as the product does (``engine.trainer.export_hf``): the wrapped HF model's
    ``save_pretrained`` with the scorer's state dict (``hf_model.`` prefix removed), then the
    tokenizer. The folder is a plain Hugging Face checkpoint."""
    state = {k.removeprefix("hf_model."): v for k, v in scorer.state_dict().items()}
    scorer.hf_model.save_pretrained(out_dir, state_dict=state)
    tok.save_pretrained(out_dir)


def test_xlmr_other_head_size_and_save_roundtrip(tiny_dirs, tmp_path):
    saved_emb = load_scorer("xlmr", tiny_dirs["xlmr"], 3)[0].hf_model.get_input_embeddings()
    scorer, tok, _ = load_scorer("xlmr", tiny_dirs["xlmr"], 5)
    assert scorer.num_labels == 5
    assert scorer.hf_model.classifier.out_proj.weight.shape == (5, 64)
    assert scorer(**encode_views(tok, TEXTS, 32)).shape == (3, 5)
    assert scorer.hf_model.config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    # The encoder still comes from the checkpoint.
    assert torch.equal(scorer.hf_model.get_input_embeddings().weight, saved_emb.weight)

    # export -> reload with the same head size restores the head exactly.
    _export(scorer, tok, tmp_path / "ckpt")
    again, _, _ = load_scorer("xlmr", tmp_path / "ckpt", 5)
    for (k, a), (_, b) in zip(scorer.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_mt5_save_roundtrip_keeps_untied_head(tiny_dirs, tmp_path):
    scorer, tok, _ = _load("mt5", tiny_dirs["mt5"])
    with torch.no_grad():
        scorer.hf_model.lm_head.weight[:, 0] += 1.0  # make the saved head distinguishable
    _export(scorer, tok, tmp_path / "ckpt")
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


# ----------------------------------------------------------------------------- cloze head and
# per-language label words

CLOZE_WORDS = WORDS + ["yes maybe no", "oui peut non , ?"]
FR_WORDS = ["oui", "peut", "non"]
CLOZE_VIEWS = [
    ("the cat sat on the mat ?", "<mask> , a dog ran"),
    ("hello world ?", "<mask> , is it true"),
    ("a dog ran far away ?", "<mask> , the cat sat on the mat"),
]


@pytest.fixture(scope="module")
def cloze_dir(tmp_path_factory):
    # A sequence-classification tiny model: the cloze path must add a fresh MLM head.
    root = tmp_path_factory.mktemp("cloze")
    return build_tiny_model(root / "xlmr", "xlmr", CLOZE_WORDS, LABEL_NAMES, seed=2)


def _cloze(path, words=LABEL_WORDS, **kw):
    return load_scorer("xlmr", path, 3, head="cloze", label_words=words, **kw)


def _naive_cloze(scorer, batch, table_rows):
    """Full MaskedLM forward: [B, L, V] logits at the mask position, label columns."""
    out = scorer.hf_model(**batch).logits  # [B, L, V]
    pos = (batch["input_ids"] == scorer.mask_token_id).nonzero()
    assert pos[:, 0].tolist() == list(range(len(table_rows)))  # one mask per row
    at_mask = out[pos[:, 0], pos[:, 1]]  # [B, V]
    return torch.stack([at_mask[b, ids] for b, ids in enumerate(table_rows)])


def test_cloze_matches_full_masked_lm(cloze_dir):
    scorer, tok, warnings = _cloze(cloze_dir)
    assert isinstance(scorer, XLMRCloze) and scorer.head == "cloze" and scorer.family == "xlmr"
    assert len(warnings) == 1 and "no masked-LM head" in warnings[0]
    assert "lm_head.dense.weight" in warnings[0] and "freshly initialised" in warnings[0]
    assert scorer.num_labels == 3 and not scorer.per_language and not scorer.training
    ids = tok.convert_tokens_to_ids(LABEL_WORDS)
    assert scorer.label_token_ids.tolist() == [ids]
    assert "label_token_ids" not in scorer.state_dict()
    assert scorer.mask_token_id == tok.mask_token_id
    batch = encode_views(tok, CLOZE_VIEWS, 32)
    with torch.no_grad():
        got = scorer(**batch)
        want = _naive_cloze(scorer, batch, [ids] * 3)
        # A shared table ignores lang_ids.
        again = scorer(**batch, lang_ids=torch.tensor([5, 0, 2]))
    assert got.shape == (3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


def test_cloze_per_language_rows_and_lang_ids(cloze_dir):
    rows = [LABEL_WORDS, FR_WORDS]
    scorer, tok, warnings = _cloze(cloze_dir, rows, languages=["en", "fr"])
    assert scorer.per_language and scorer.num_label_rows == 2 and scorer.num_labels == 3
    table = [tok.convert_tokens_to_ids(r) for r in rows]
    assert scorer.label_token_ids.tolist() == table
    batch = encode_views(tok, CLOZE_VIEWS, 32)
    lang_ids = torch.tensor([1, 0, 1])
    with torch.no_grad():
        got = scorer(**batch, lang_ids=lang_ids)
        want = _naive_cloze(scorer, batch, [table[i] for i in lang_ids.tolist()])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="per-language label words .2 rows.*lang_ids"):
        scorer(**batch)
    with pytest.raises(ValueError, match=r"lang_ids must lie in \[0, 2\)"):
        scorer(**batch, lang_ids=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="shape"):
        scorer(**batch, lang_ids=torch.tensor([0, 1]))


def test_cloze_mask_count_errors(cloze_dir):
    scorer, tok, _ = _cloze(cloze_dir)
    views = [CLOZE_VIEWS[0], ("hello world ?", "yes , is it true"), ("<mask> <mask>", "a dog")]
    batch = encode_views(tok, views, 32)
    with pytest.raises(ValueError, match="exactly once.*row 1: 0, row 2: 2.*truncated away"):
        scorer(**batch)
    # The mask truncated away by max_length.
    batch = encode_views(tok, ["the cat sat on the mat <mask>"], 5)
    with pytest.raises(ValueError, match="row 0: 0"):
        scorer(**batch)


def test_cloze_save_roundtrip(cloze_dir, tmp_path):
    scorer, tok, _ = _cloze(cloze_dir, [LABEL_WORDS, FR_WORDS], languages=["en", "fr"])
    with torch.no_grad():
        scorer.hf_model.lm_head.dense.weight.mul_(1.5)  # distinguishable from a fresh init
    _export(scorer, tok, tmp_path / "ckpt")
    again, tok2, warnings = _cloze(tmp_path / "ckpt", [LABEL_WORDS, FR_WORDS])
    assert warnings == []  # the MLM head is in the checkpoint now
    assert isinstance(again, XLMRCloze)
    a_state, b_state = scorer.state_dict(), again.state_dict()
    assert a_state.keys() == b_state.keys()
    for k in a_state:
        assert torch.equal(a_state[k], b_state[k]), k
    assert torch.equal(again.label_token_ids, scorer.label_token_ids)
    batch = encode_views(tok2, CLOZE_VIEWS, 32)
    lang_ids = torch.tensor([0, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(
            again(**batch, lang_ids=lang_ids), scorer(**batch, lang_ids=lang_ids), rtol=0, atol=0
        )


def test_mt5_per_language_label_words_match_full_model(tiny_dirs):
    rows = [LABEL_WORDS, ["cat", "dog", "mat"], ["no", "yes", "maybe"]]
    scorer, tok, warnings = load_scorer(
        "mt5", tiny_dirs["mt5"], 3, label_words=rows, languages=["en", "xx", "yy"]
    )
    assert warnings == [] and scorer.per_language and scorer.head == "label_words"
    table = [tok.convert_tokens_to_ids(r) for r in rows]
    assert scorer.label_token_ids.tolist() == table
    batch = encode_views(tok, TEXTS, 32)
    lang_ids = torch.tensor([2, 0, 1])
    with torch.no_grad():
        got = scorer(**batch, lang_ids=lang_ids)
        full = scorer.hf_model(**batch, decoder_input_ids=torch.zeros(3, 1, dtype=torch.long))
        step0 = full.logits[:, 0]  # [B, V]
    want = torch.stack([step0[b, table[t]] for b, t in enumerate(lang_ids.tolist())])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="lang_ids"):
        scorer(**batch)


def test_classifier_ignores_lang_ids(tiny_dirs):
    scorer, tok, _ = _load("xlmr", tiny_dirs["xlmr"])
    assert not scorer.per_language and scorer.head == "classification"
    batch = encode_views(tok, TEXTS, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            scorer(**batch, lang_ids=torch.tensor([3, 1, 0])), scorer(**batch), rtol=0, atol=0
        )


def test_load_scorer_head_errors(tiny_dirs, cloze_dir):
    assert HEADS == {"xlmr": ("classification", "cloze"), "mt5": ("label_words",)}
    with pytest.raises(
        ValueError,
        match="unknown head 'classification' for model family 'mt5'; valid heads: "
        r"xlmr: classification \(default\), cloze; mt5: label_words \(default\)",
    ):
        load_scorer("mt5", tiny_dirs["mt5"], 3, head="classification", label_words=LABEL_WORDS)
    with pytest.raises(ValueError, match="unknown head 'label_words' for model family 'xlmr'"):
        load_scorer("xlmr", tiny_dirs["xlmr"], 3, head="label_words")
    with pytest.raises(ValueError, match="head 'cloze' needs label_words"):
        load_scorer("xlmr", cloze_dir, 3, head="cloze")
    # head=None is the family default.
    assert isinstance(load_scorer("xlmr", tiny_dirs["xlmr"], 3, head=None)[0], XLMRClassifier)
    mt5, _, _ = load_scorer("mt5", tiny_dirs["mt5"], 3, head="label_words", label_words=LABEL_WORDS)
    assert isinstance(mt5, MT5LabelWords)


def _word_warnings(warnings):
    return [w for w in warnings if "masked-LM head" not in w]


def test_per_language_label_word_errors(cloze_dir):
    langs = ["en", "fr"]
    with pytest.raises(ValueError, match="language 'fr' .row 1.: label word 'zebra'.*unknown"):
        _cloze(cloze_dir, [LABEL_WORDS, ["oui", "zebra", "non"]], languages=langs)
    with pytest.raises(ValueError, match="language 'fr' .row 1.: label words 'non' and 'non'"):
        _cloze(cloze_dir, [LABEL_WORDS, ["oui", "non", "non"]], languages=langs)
    with pytest.raises(ValueError, match="language 'fr' .row 1.: got 2 words"):
        _cloze(cloze_dir, [LABEL_WORDS, ["oui", "non"]], languages=langs)
    with pytest.raises(ValueError, match="language row 1: label word 'zebra'"):
        _cloze(cloze_dir, [LABEL_WORDS, ["oui", "zebra", "non"]])  # no codes: row index
    with pytest.raises(ValueError, match="2 rows of label_words for 3 languages"):
        _cloze(cloze_dir, [LABEL_WORDS, FR_WORDS], languages=["en", "fr", "de"])
    with pytest.raises(ValueError, match="list of C words .* or a list of T lists"):
        _cloze(cloze_dir, ["yes", ["maybe"], "no"])
    # The same words in two languages (even in another order) are fine.
    scorer, _, warnings = _cloze(cloze_dir, [LABEL_WORDS, ["no", "yes", "maybe"]], languages=langs)
    assert _word_warnings(warnings) == [] and scorer.num_label_rows == 2
    # A split word warns and names its language.
    _, _, warnings = _cloze(cloze_dir, [LABEL_WORDS, ["oui", "peut non", "non ,"]], languages=langs)
    assert _word_warnings(warnings) == [
        "language 'fr' (row 1): label word 'peut non' is split into 2 pieces; using the first "
        "piece 'peut'",
        "language 'fr' (row 1): label word 'non ,' is split into 2 pieces; using the first "
        "piece 'non'",
    ]
