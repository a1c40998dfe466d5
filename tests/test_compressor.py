"""The compressor yardstick (fmkernels/data/compressor.py): figures from the split the trainer uses."""
import json
import lzma

import pytest

from fmkernels.data import split_documents, user_documents
from fmkernels.data.compressor import compressed_bits_per_byte, compressor_baseline, format_baseline, split_bytes


def _corpus(tmp_path, n=60):
    p = tmp_path / "c.jsonl"
    with open(p, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"def f{i % 7}(x):\n    return x * {i % 5} + {i % 3}\n"}) + "\n")
    return str(p)


def test_split_bytes_match_the_trainers_split(tmp_path):
    path = _corpus(tmp_path)
    train, val, digest = split_bytes(path, 0.2)
    docs, d2 = user_documents(path)
    tr, va = split_documents(docs, 0.2)
    assert digest == d2
    assert val == "".join(d.text + "\n\n" for d in va).encode()
    assert train == "".join(d.text + "\n\n" for d in tr).encode()


def test_xz_figures_and_context_gain(tmp_path):
    train = b"the quick brown fox jumps over the lazy dog\n" * 50
    val = b"the quick brown fox jumps over the lazy dog\n" * 3 + b"a fresh line\n"
    r = compressed_bits_per_byte(train, val, ["xz"])
    alone = 8 * len(lzma.compress(val, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)) / len(val)
    assert r["xz"]["alone"] == pytest.approx(alone)
    assert r["xz"]["with_train"] < r["xz"]["alone"]  # the training text is in the dictionary


def test_baseline_cached_and_formatted(tmp_path, monkeypatch):
    monkeypatch.setenv("FMK_CACHE_DIR", str(tmp_path / "cache"))
    path = _corpus(tmp_path)
    r1 = compressor_baseline(path, 0.2, methods=["zlib", "bz2"])
    assert set(r1["bpb"]) == {"zlib", "bz2"} and r1["val_bytes"] > 0
    assert list((tmp_path / "cache" / "compressor").glob("*.json"))
    r2 = compressor_baseline(path, 0.2, methods=["zlib"])
    assert r2["bpb"]["zlib"] == r1["bpb"]["zlib"]
    lines = format_baseline(r1)
    assert len(lines) == 2 and "bits per byte alone" in lines[0]


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        compressed_bits_per_byte(b"a", b"b", ["rar"])
    with pytest.raises(ValueError, match="val"):
        compressed_bits_per_byte(b"a", b"", ["xz"])
