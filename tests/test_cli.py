"""The `tl-core` command-line contract (DESIGN.md): JSON on stdout, exit 2 + `error:` for bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import EMOJI, FASHION, ROOT, make_class_folder, cli_fail as fail, cli_json as run_json

TL_CORE = shutil.which("tl-core") or str(Path(sys.executable).parent / "tl-core")


def test_backbones_json(capsys, tl_home):
    rows = run_json(capsys, "backbones", "--json")
    assert [r["name"] for r in rows][:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert rows[0]["available_offline"] is True


def test_check_json(capsys, tl_home):
    rep = run_json(capsys, "check", str(FASHION), "--json")
    assert rep["num_classes"] == 10 and rep["split"] == {"train": 240, "val": 60, "test": 200}
    assert set(rep) >= {"counts", "skipped", "image_size", "imbalance_ratio", "warnings"}


@pytest.mark.processes
def test_the_command_exits_quickly_yet_runs_exit_handlers_and_flushes(tl_home, tmp_path):
    """``tl-core`` leaves without the interpreter's teardown (cli.run): the exit status, the whole output and the
    exit handlers (temporary folders, workers) must survive that."""
    marker = tmp_path / "exit-handler-ran"
    code = ("import atexit, os, pathlib, sys; atexit.register(lambda: pathlib.Path(os.environ['MARKER']).write_text("
            "'ran')); sys.argv[1:] = {argv!r}; from tl_core.cli import run; run()")
    env = {**os.environ, "TL_HOME": str(tl_home), "MARKER": str(marker)}
    p = subprocess.run([sys.executable, "-c", code.format(argv=["backbones", "--json"])],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert len(json.loads(p.stdout)) >= 3 and marker.read_text() == "ran"
    marker.unlink()
    p = subprocess.run([sys.executable, "-c", code.format(argv=["check", str(tmp_path / "nothing")])],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and marker.read_text() == "ran"


@pytest.mark.slow
def test_train_json_in_a_real_process_then_evaluate_predict_runs(capsys, tl_home):
    env = {**os.environ, "TL_HOME": str(tl_home)}
    p = subprocess.run([TL_CORE, "train", str(FASHION), "--backbone", "efficientnet_lite0", "--strategy", "linear",
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)  # exactly one JSON document on stdout; progress went to stderr
    assert set(res) >= {"run_id", "run_dir", "status", "classes", "val_accuracy", "seconds"}
    assert res["status"] == "done" and len(res["classes"]) == 10 and "solver round" in p.stderr
    # the default features=auto says what it chose and the cross-validation scores behind it
    assert res["features"] in ("last", "depths") and set(res["cv"]) == {"last@1", "depths@1", "depths@0.3"}
    assert res["cv"][f"{res['features']}@{res['linear_c']:g}"] == max(res["cv"].values())

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


def test_train_input_typos_leave_no_failed_run_behind(capsys, tl_home, tmp_path):
    """A class folder missing, a path that does not exist, a text file named .zip: one error line, exit 2, and
    `tl-core runs` stays empty (no 'failed' run for a typo), nor a run directory."""
    one = make_class_folder(tmp_path / "one", {"cats": 3})  # the other class folder is missing
    (tmp_path / "notes.zip").write_text("not a zip at all, a text file\n")
    assert "Only one class" in fail(capsys, "train", str(one), "--quiet")
    assert "does not exist" in fail(capsys, "train", str(tmp_path / "typo"), "--quiet")
    assert "not a readable zip" in fail(capsys, "train", str(tmp_path / "notes.zip"), "--quiet")
    from tl_core.cli import main

    assert main(["train", str(one)]) == 2  # with its progress lines too: one error line, the last
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error: ")] == err[-1:]
    # a group of processes records its run before they start: the data is checked first there too
    assert "Only one class" in fail(capsys, "train", str(one), "--nproc", "2", "--quiet")
    assert "not a readable zip" in fail(capsys, "train", str(tmp_path / "notes.zip"), "--nproc", "2", "--quiet")
    assert run_json(capsys, "runs", "--json") == []
    runs_dir = tl_home / "runs"
    assert not runs_dir.exists() or not [p for p in runs_dir.iterdir() if not p.name.startswith(".")]


@pytest.mark.processes
def test_usage_error_in_a_real_process(tl_home):
    p = subprocess.run([TL_CORE, "train"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stdout == ""


@pytest.mark.slow
def test_evaluate_with_unknown_classes(capsys, emoji_run, tmp_path):
    ws, res = emoji_run
    other = make_class_folder(tmp_path / "o", {"animal": 2, "robots": 2})
    msg = fail(capsys, "evaluate", str(ws.run_dir(res.run_id)), "--data", str(other))
    assert "not trained on: robots" in msg


# --------------------------------------------------------------------------------------------------
# tl-core train --config: repeat a run, flags override the file
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_config_repeats_a_run_and_flags_override_it(capsys, tl_home, shared_cache):
    from insight_support import emoji_small
    from tl_core.storage.files import RunFiles

    data = str(emoji_small(shared_cache))
    first = run_json(capsys, "train", data, "--seed", "3", "--linear-c", "0.5", "--no-refit", "--val-split", "0.25",
                     "--json", "--quiet")
    a = RunFiles(first["run_dir"])
    assert a.config().seed == 3 and a.config().linear_c == 0.5 and a.config().refit is False

    again = run_json(capsys, "train", data, "--config", str(Path(first["run_dir"]) / "config.json"), "--json", "--quiet")
    b = RunFiles(again["run_dir"])
    assert again["run_id"] != first["run_id"]
    assert b.config_dict() == a.config_dict()  # the same configuration, saved again
    assert again["val_accuracy"] == first["val_accuracy"] and again["val_loss"] == first["val_loss"]
    pa, pb = a.predictions().get("val"), b.predictions().get("val")
    assert pa.paths == pb.paths and np.array_equal(pa.logits, pb.logits)  # the same run, image for image

    # the run directory works as --config too; a flag given on the command line wins over the file
    other = run_json(capsys, "train", data, "--config", first["run_dir"], "--seed", "4", "--refit", "--json", "--quiet")
    c = RunFiles(other["run_dir"])
    assert c.config_dict() == {**a.config_dict(), "seed": 4, "refit": True}
    assert c.meta().refitted and c.predictions().get("val").paths != pa.paths  # another seed: another split

    assert "does not exist" in fail(capsys, "train", data, "--config", str(tl_home / "nope.json"))
    (tl_home / "bad.json").write_text("[1, 2]")
    assert "must hold a JSON object" in fail(capsys, "train", data, "--config", str(tl_home / "bad.json"))
    (tl_home / "typo.json").write_text(json.dumps({"epochs": 0}))
    assert "Epochs must be between" in fail(capsys, "train", data, "--config", str(tl_home / "typo.json"))


# --------------------------------------------------------------------------------------------------
# documentation: flags with help, and docs/cli.md's contract is the parser's
# --------------------------------------------------------------------------------------------------
def _subcommands() -> dict:
    import argparse

    from tl_core.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = dict(sub.choices)
    for name, sp in sub.choices.items():  # `tl-core data import ...`: a command with verbs is one entry per verb
        nested = [a for a in sp._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            del out[name]
            out.update({f"{name} {verb}": v for verb, v in nested[0].choices.items()})
    return out


def _options(subparser) -> dict[str, object]:
    return {s: a for a in subparser._actions for s in a.option_strings}


def test_every_config_field_has_a_train_flag_with_help():
    import argparse

    from tl_core.config import config_fields

    opts = _options(_subcommands()["train"])
    for spec in config_fields():
        flag = "--" + spec.name.replace("_", "-")
        assert flag in opts, flag
        action = opts[flag]
        assert action.dest == spec.name and action.default is None  # not given: the --config file's value
        assert action.help and spec.help.replace("%", "%%") in action.help, flag
        if spec.choices and spec.strict:
            assert sorted(action.choices) == sorted(spec.choices), flag
        elif spec.choices:  # common values, not the only ones (--device cuda:1): checked by the config instead
            assert action.choices is None and all(c in action.help for c in spec.choices), flag
        if isinstance(action, argparse.BooleanOptionalAction):
            assert "--no-" + flag[2:] in opts
    assert {"--config", "--test", "--json", "--quiet", "--nproc"} <= set(opts)


def _readme_contract() -> dict[str, str]:
    """The fenced block after "The contract" in docs/cli.md, as {sub-command: its text}."""
    text = (ROOT / "docs" / "cli.md").read_text()
    block = text[text.index("The contract"):]
    block = block[block.index("```") + 3:]
    block = block[block.index("\n") + 1:block.index("```")]
    out: dict[str, str] = {}
    last = None
    for line in block.splitlines():
        m = re.match(r"tl-core (data \S+|\S+)(.*)", line)
        if m:
            last = m.group(1)
            out[last] = m.group(2)
        elif line.strip():
            assert last, line
            out[last] += " " + line.strip()
    return out


def test_readme_contract_matches_the_parser():
    readme, parser = _readme_contract(), _subcommands()
    assert set(readme) == set(parser), (set(readme) ^ set(parser))
    for name, text in readme.items():
        usage = text.split("#")[0]  # what follows '#' is a comment
        opts = _options(parser[name])
        flags = re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", usage)
        for flag in flags:
            assert flag in opts, f"docs/cli.md lists `tl-core {name} {flag}`, which the parser does not have"
        # a flag shown with its choices (a|b|c) offers exactly those
        for flag, choices in re.findall(r"(--[a-z][a-z0-9-]*) ([a-z0-9_]+(?:\|[a-z0-9_]+)+)", usage):
            assert sorted(choices.split("|")) == sorted(opts[flag].choices), (name, flag)
        required = {s for a in parser[name]._actions if a.required and a.option_strings for s in a.option_strings[:1]}
        assert required <= set(flags), f"docs/cli.md omits required flags of {name}: {required - set(flags)}"
    assert "--config" in readme["train"] and "TrainConfig" in readme["train"]


# --------------------------------------------------------------------------------------------------
# --json on failure, the subcommand's own usage errors, float flags, flags a strategy does not use
# --------------------------------------------------------------------------------------------------
def _run(capsys, *argv) -> tuple[int, str, list[str]]:
    from tl_core.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err.strip().splitlines()


def test_json_failures_still_print_one_json_document(capsys, tl_home, tmp_path):
    """A script that runs `tl-core ... --json` parses stdout: a usage error (found by argparse) and an error found
    later (a TLError) each give one JSON document with the error and the exit status, beside the stderr line."""
    for argv, said in ((["train", str(EMOJI), "--json", "--epochz", "3"], "--epochz"),
                       (["train", str(EMOJI), "--json", "--strategy", "autp"], "autp"),
                       (["train", str(tmp_path / "missing"), "--json", "--quiet"], "does not exist")):
        code, out, err = _run(capsys, *argv)
        doc = json.loads(out)  # exactly one document: json.loads refuses trailing text
        assert code == 2 and doc["exit_status"] == 2 and said in doc["error"], (argv, out)
        assert len(err) == 1 and err[0] == "error: " + doc["error"]
    code, out, err = _run(capsys, "train", str(EMOJI), "--epochz", "3")  # without --json: stdout stays empty
    assert code == 2 and out == "" and len(err) == 1


def test_an_unknown_option_is_reported_by_its_subcommand(capsys, tl_home):
    """`tl-core --help` does not list train's options: the error points at `tl-core train --help`, and at the
    nearest option it has."""
    line = fail(capsys, "train", str(EMOJI), "--epochz", "3")
    assert "unrecognized arguments: --epochz 3" in line and "did you mean --epochs?" in line
    assert "`tl-core train --help`" in line
    assert "`tl-core data import --help`" in fail(capsys, "data", "import", "x", "--bogus")
    assert "`tl-core --help`" in fail(capsys, "--bogus", "runs")  # before the sub-command: the top level's


def test_every_float_setting_takes_a_fraction(tmp_path):
    """`--time-budget 90.5` (help: "default: 120.0") is a number of seconds like any other, not an int."""
    import dataclasses

    from tl_core.cli import build_parser, config_from_args
    from tl_core.config import TrainConfig

    args = build_parser().parse_args(["train", "x", "--time-budget", "90.5", "--warmup-epochs", "0.5"])
    cfg = config_from_args(args)
    assert cfg.time_budget == 90.5 and cfg.warmup_epochs == 0.5
    opts = _options(_subcommands()["train"])
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, float):
            assert opts["--" + f.name.replace("_", "-")].type is float, f.name


def test_flags_the_strategy_does_not_use_get_a_note(capsys, tl_home, tmp_path):
    """auto gives each try its own epochs, lr and patience; --time-budget is auto's alone: a flag given that has
    no effect says so on stderr (the run goes on; here it fails later, on the missing folder)."""
    missing = str(tmp_path / "missing")
    code, _, err = _run(capsys, "train", missing, "--epochs", "30", "--lr", "3e-4", "--batch-size", "8")
    assert code == 2 and err[0].startswith("note: --epochs and --lr have no effect with the auto strategy")
    assert "--batch-size" not in err[0]  # auto's fine-tune try uses it
    assert err[-1].startswith("error: ") and len(err) == 2
    code, _, err = _run(capsys, "train", missing, "--strategy", "linear", "--time-budget", "50")
    assert err[0] == "note: --time-budget has no effect with the linear strategy (used by auto)."
    code, _, err = _run(capsys, "train", missing, "--strategy", "partial", "--epochs", "3", "--batch-size", "8")
    assert not [line for line in err if line.startswith("note:")]  # all used


def test_json_output_never_builds_the_text_lines(capsys, tl_home, tmp_path, monkeypatch):
    """A slip in the lines a person reads cannot fail `--json` (they are built only without it)."""
    import tl_core.cli as cli
    import tl_core.share.formats as formats

    def broken_summary(out):
        raise KeyError("a formatting slip")

    monkeypatch.setattr(cli, "_resolve_run_dir", lambda ref: tmp_path)
    monkeypatch.setattr(formats, "export_model", lambda run, fmt, out: {"format": fmt, "path": out})
    monkeypatch.setattr(formats, "export_summary", broken_summary)
    code, out, _ = _run(capsys, "export", "r", "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--json")
    assert code == 0 and json.loads(out)["format"] == "onnx"
    code, out, err = _run(capsys, "export", "r", "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert code == 1 and err[-1].startswith("internal error: KeyError")  # the text path still runs it
