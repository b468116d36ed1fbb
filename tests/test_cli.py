"""The `tl-core` command-line contract (DESIGN.md): JSON on stdout, exit 2 + `error:` for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import EMOJI, FASHION, make_class_folder
from tl_core.cli import main

TL_CORE = shutil.which("tl-core") or str(Path(sys.executable).parent / "tl-core")


def run_json(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 0, out.err
    return json.loads(out.out)


def fail(capsys, *argv) -> str:
    code = main(list(argv))
    out = capsys.readouterr()
    assert code == 2, (code, out.err)
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    return lines[0]


def test_backbones_json(capsys, tl_home):
    rows = run_json(capsys, "backbones", "--json")
    assert [r["name"] for r in rows][:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert rows[0]["available_offline"] is True


def test_check_json(capsys, tl_home):
    rep = run_json(capsys, "check", str(FASHION), "--json")
    assert rep["num_classes"] == 10 and rep["split"] == {"train": 240, "val": 60, "test": 200}
    assert set(rep) >= {"counts", "skipped", "image_size", "imbalance_ratio", "warnings"}


def test_train_json_in_a_real_process_then_evaluate_predict_runs(capsys, tl_home):
    env = {**os.environ, "TL_HOME": str(tl_home)}
    p = subprocess.run([TL_CORE, "train", str(FASHION), "--backbone", "efficientnet_lite0", "--strategy", "linear",
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)  # exactly one JSON document on stdout; progress went to stderr
    assert set(res) >= {"run_id", "run_dir", "status", "classes", "val_accuracy", "seconds"}
    assert res["status"] == "done" and len(res["classes"]) == 10 and "epoch" in p.stderr

    ev = run_json(capsys, "evaluate", res["run_id"], "--data", str(FASHION), "--json")
    assert ev["evaluated"] == "test split" and ev["count"] == 200
    assert np.array(ev["confusion"]).sum() == 200 and np.array(ev["confusion"]).shape == (10, 10)
    assert ev["accuracy"] >= 0.78
    assert set(ev["per_class"]["bag"]) == {"precision", "recall", "f1", "support"}
    assert sum(v["support"] for v in ev["per_class"].values()) == 200
    # the run directory works as RUN too
    ev2 = run_json(capsys, "evaluate", res["run_dir"], "--data", str(FASHION / "test"), "--json")
    assert ev2["accuracy"] == ev["accuracy"]

    imgs = sorted((FASHION / "test" / "trouser").iterdir())[:3]
    preds = run_json(capsys, "predict", res["run_id"], *map(str, imgs), "--top-k", "2", "--json")
    assert len(preds) == 3 and all(set(r) >= {"path", "label", "confidence", "top_k"} for r in preds)
    assert [r["label"] for r in preds].count("trouser") >= 2 and len(preds[0]["top_k"]) == 2

    runs = run_json(capsys, "runs", "--json")
    assert runs[0]["id"] == res["run_id"] and runs[0]["status"] == "done"


def test_usage_errors_exit_2_with_one_error_line(capsys, tl_home, tmp_path):
    assert "does not exist" in fail(capsys, "train", str(tmp_path / "missing"))
    assert "invalid choice: 'magic'" in fail(capsys, "train", str(EMOJI), "--strategy", "magic")
    assert "Epochs must be between" in fail(capsys, "train", str(EMOJI), "--epochs", "0")
    assert "No run or run directory" in fail(capsys, "evaluate", "nope", "--data", str(EMOJI))
    one = make_class_folder(tmp_path / "one", {"cats": 3})
    assert "Only one class" in fail(capsys, "check", str(one))
    (tmp_path / "bad.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    assert "not a readable zip" in fail(capsys, "check", str(tmp_path / "bad.zip"))
    assert "Unknown backbone" in fail(capsys, "train", str(EMOJI), "--backbone", "nonet_9000")


def test_usage_error_in_a_real_process(tl_home):
    p = subprocess.run([TL_CORE, "train"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stdout == ""


def test_evaluate_with_unknown_classes(capsys, emoji_run, tmp_path):
    ws, res = emoji_run
    other = make_class_folder(tmp_path / "o", {"animal": 2, "robots": 2})
    msg = fail(capsys, "evaluate", str(ws.run_dir(res.run_id)), "--data", str(other))
    assert "not trained on: robots" in msg
