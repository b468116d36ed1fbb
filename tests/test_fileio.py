"""tl_core/fileio.py: the one atomic write (a reader sees the old file or the new one, never half of one)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tl_core.fileio import write_atomic, write_json_atomic, writing_atomic


def test_text_bytes_and_json_replace_the_file_whole(tmp_path):
    f = tmp_path / "sub" / "a.txt"  # the folder is made
    write_atomic(f, "héllo")
    assert f.read_text(encoding="utf-8") == "héllo"
    write_atomic(f, b"\x00\x01")
    assert f.read_bytes() == b"\x00\x01"
    write_json_atomic(f, {"v": [1, 2]}, indent=None, separators=(",", ":"))
    assert f.read_text() == '{"v":[1,2]}'
    assert sorted(p.name for p in f.parent.iterdir()) == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    f = tmp_path / "x.npy"
    write_atomic(f, b"old")
    with pytest.raises(RuntimeError), writing_atomic(f) as tmp:
        tmp.write_bytes(b"half")
        assert tmp.parent == f.parent and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        raise RuntimeError("the writer failed half-way")
    assert f.read_bytes() == b"old" and list(tmp_path.iterdir()) == [f]
    with pytest.raises(TypeError):
        write_json_atomic(f, {"v": object()})  # cannot be encoded: nothing is written
    assert f.read_bytes() == b"old" and list(tmp_path.iterdir()) == [f]


def test_writing_atomic_gives_a_name_for_writers_that_want_one(tmp_path):
    f = tmp_path / "v.npy"
    with writing_atomic(f) as tmp, open(tmp, "wb") as fh:
        assert not f.exists()  # nothing is visible until the block ends
        np.save(fh, np.arange(3), allow_pickle=False)
    assert np.load(f).tolist() == [0, 1, 2]
    with writing_atomic(tmp_path / "m.onnx", suffix=".onnx") as tmp:
        assert tmp.suffix == ".onnx"
        tmp.write_text("model")
    assert (tmp_path / "m.onnx").read_text() == "model"
    assert json.loads(json.dumps(sorted(p.name for p in tmp_path.iterdir()))) == ["m.onnx", "v.npy"]
