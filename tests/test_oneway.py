"""One way to do each job (issue 26). Fast tier: models with random weights, nothing trained.

- Optimisers and schedules come from one factory (tl_core.models.training.create_optimizer), shared by
  fine-tuning and the Lab, and the Lab unfreezes with partial fine-tuning's ``set_trainable``. The numbers must not
  change: each strategy's parameter groups and learning rates are compared with what the hand-built code they
  replace (kept below, verbatim) produced.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from tl_core.config import TrainConfig
from tl_core.models.backbones import build_model
from tl_core.models.training import create_optimizer, finetune_groups, lr_lambda, set_trainable, trainable_groups

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    model, _ = build_model("efficientnet_lite0", 5, weights="random", seed=0)
    return model


def _shape(groups: list[dict]) -> list[tuple[list[int], float]]:
    """Each group's parameters (by identity, in order) and learning rate."""
    return [([id(p) for p in g["params"]], g["lr"]) for g in groups]


def _old_finetune_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """tl_core.models.training.finetune before the factory (commit bafd05a), verbatim."""
    head_params = list(model.get_classifier().parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    body_lr = cfg.lr if cfg.strategy == "scratch" else cfg.lr * cfg.backbone_lr_mult
    groups = [{"params": head_params, "lr": cfg.lr}]
    if body:
        groups.append({"params": body, "lr": body_lr})
    return groups


@pytest.mark.parametrize("strategy,unfreeze", [("partial", 1), ("partial", 2), ("partial", 7), ("full", 2),
                                               ("scratch", 2)])
def test_finetune_groups_are_the_hand_built_ones(lite0, strategy, unfreeze):
    m = copy.deepcopy(lite0)
    cfg = TrainConfig(strategy=strategy, unfreeze_blocks=unfreeze).resolved()
    set_trainable(m, strategy, unfreeze)
    new, old = finetune_groups(m, cfg), _old_finetune_groups(m, cfg)
    assert _shape(new) == _shape(old)
    assert len(new) == 2 and new[1]["lr"] == (cfg.lr if strategy == "scratch" else cfg.lr * cfg.backbone_lr_mult)
    # the factory builds the same optimiser and schedule as before
    opt, sched = create_optimizer(new, cfg.weight_decay, 40, 8)
    ref = torch.optim.AdamW(old, weight_decay=cfg.weight_decay)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lr_lambda(40, 8))
    assert type(opt) is type(ref) and opt.defaults == ref.defaults
    for _ in range(40):
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
        assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in ref.param_groups]
        opt.step(), ref.step()  # no gradients: nothing moves, the schedule does
        sched.step(), ref_sched.step()
    assert all(g["lr"] == 0 for g in opt.param_groups)  # cosine to 0 at the last step


@pytest.mark.parametrize("k", [1, 2, 4])
def test_lab_unfreezes_as_partial_fine_tuning_does(lite0, k):
    """The Lab's fine-tuning arm used its own EfficientNet-only unfreezing (the last k stages, conv_head, bn2 and
    the head); set_trainable("partial", k) trains exactly those, and its groups are the hand-built ones."""
    from tl_core.insight.lab import _FT_BODY_LR, _FT_HEAD_LR

    old = copy.deepcopy(lite0)  # tl_core.insight.lab._finetune_arm before the factory (commit bafd05a), verbatim
    for p in old.parameters():
        p.requires_grad_(False)
    body = [p for mod in (old.blocks[-k:], old.conv_head, old.bn2) for p in mod.parameters()]
    clf = old.get_classifier()
    for p in body + list(clf.parameters()):
        p.requires_grad_(True)
    old_groups = [{"params": list(clf.parameters()), "lr": _FT_HEAD_LR}, {"params": body, "lr": _FT_BODY_LR}]

    new = copy.deepcopy(lite0)
    set_trainable(new, "partial", k)
    assert [n for n, p in new.named_parameters() if p.requires_grad] == \
        [n for n, p in old.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in old.named_parameters()}
    new_names = {id(p): n for n, p in new.named_parameters()}
    assert [([new_names[i] for i in ids], lr) for ids, lr in _shape(trainable_groups(new, _FT_HEAD_LR, _FT_BODY_LR))] \
        == [([names[i] for i in ids], lr) for ids, lr in _shape(old_groups)]


def test_lab_scratch_arm_keeps_one_group(lite0):
    cfg = TrainConfig(strategy="scratch").resolved()
    (group,) = trainable_groups(lite0, cfg.lr)
    assert [id(p) for p in group["params"]] == [id(p) for p in lite0.parameters()] and group["lr"] == cfg.lr


def test_every_optimiser_and_schedule_comes_from_the_factory():
    """No module but the factory builds AdamW or a LambdaLR schedule (the probes' L-BFGS is a solver of its own)."""
    pattern = re.compile(r"torch\.optim\.(?!LBFGS\b|Optimizer\b|lr_scheduler\.LRScheduler\b)[A-Za-z_.]+\(")
    found = []
    for f in sorted((ROOT / "tl_core").rglob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert [x.split(":")[0] for x in found] == ["tl_core/models/training.py"] * 2, found


# --------------------------------------------------------------------------------------------------
# a task's waited and ran seconds: computed once, from the store's task row
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status,started,finished,waited,ran", [
    ("queued", None, None, 100.0, 0.0),          # still waiting: until now (200)
    ("running", 130.0, None, 30.0, 70.0),        # started after 30 s, running for 70 s so far
    ("done", 130.0, 150.0, 30.0, 20.0),
    ("cancelled", None, 140.0, 40.0, 0.0),       # cancelled while queued: it waited until then
])
def test_task_timings_come_from_the_row(status, started, finished, waited, ran, monkeypatch):
    from tl_core.runs.tasks import Task
    from tl_core.storage.store import task_ran_s, task_waited_s

    row = {"id": "t", "kind": "report", "key": "k", "lane": "cpu", "params": {}, "status": status, "created": 100.0,
           "started": started, "finished": finished, "progress": {}, "error": None, "run_id": None}
    assert (task_waited_s(row, now=200.0), task_ran_s(row, now=200.0)) == (waited, ran)
    monkeypatch.setattr("time.time", lambda: 200.0)
    task = Task.from_row(row)
    assert (task.waited_s, task.ran_s) == (task_waited_s(row), task_ran_s(row)) == (waited, ran)


def test_teacher_overview_counts_active_seconds_from_the_row(tmp_path, monkeypatch):
    from tl_core.classroom.overview import _activity
    from tl_core.storage.workspace import Workspace

    ws = Workspace(tmp_path / "home")
    store = ws.store()
    queued, _ = store.create_task("report", "k1", "cpu", {})
    running, _ = store.create_task("report", "k2", "cpu", {})
    rows = {t["id"]: t for t in store.tasks()}
    assert store.claim_task(running, 1, None)
    started = store.task(running)["started"]
    now = max(started, rows[queued]["created"]) + 42.0
    monkeypatch.setattr("time.time", lambda: now)
    act = {a["id"]: a["seconds"] for a in _activity(ws)}
    assert act == {queued: round(now - rows[queued]["created"], 1), running: round(now - started, 1)}


# --------------------------------------------------------------------------------------------------
# one bar-drawing code: the exported web page and the app's Live component both draw with tlstudio.drawBars
# --------------------------------------------------------------------------------------------------
#: Before the pages' scripts: whatever tlstudio.js sets up answers this row at once, with no model loaded.
_STUB = """
window.TLSTUDIO_MODEL = { meta: { classes: ["cat", "dog", "owl"] } };
const ROW = { label: "cat", confidence: 0.7, unknown: true, ood_reason: "style",
              top_k: [{ label: "cat", confidence: 0.7 }, { label: "dog", confidence: 0.2 }, { label: "owl", confidence: 0.1 }] };
let real;
Object.defineProperty(window, "tlstudio", { configurable: true, get: () => real, set: (v) => {
  v.ready = Promise.resolve(v.meta); v.predict = async () => ROW; real = v; } });
"""


@pytest.mark.browser
@pytest.mark.parametrize("page_html,action,bars", [
    ("tl_core/share/web/index.html", "files", "#results .card .bar"),
    ("pages/_live_component/index.html", "camera", "#bars .bar"),
])
def test_both_pages_draw_bars_with_the_shared_code(tmp_path, page_html, action, bars):
    from playwright.sync_api import sync_playwright

    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_bytes((ROOT / page_html).read_bytes())
    (site / "tlstudio.js").write_bytes((ROOT / "tl_core/share/web/tlstudio.js").read_bytes())
    (site / "x.png").write_bytes((ROOT / "sample_data/emoji").rglob("*.png").__next__().read_bytes())
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"])
        try:
            page = browser.new_context(offline=True).new_page()
            page.add_init_script(_STUB)
            page.goto((site / "index.html").as_uri())
            if action == "files":
                page.set_input_files("#files", [str(site / "x.png")])
            page.wait_for_function(f"document.querySelectorAll({bars!r}).length === 3", timeout=60_000)
            names = page.locator(bars + " .name").all_inner_texts()
            pcts = page.locator(bars + " .pct").all_inner_texts()
            widths = page.eval_on_selector_all(bars + " .fill", "els => els.map((e) => e.style.width)")
            warning = page.locator(".unknown").all_inner_texts()
        finally:
            browser.close()
    assert names == ["cat", "dog", "owl"] and pcts == ["70.0%", "20.0%", "10.0%"] and widths == ["70%", "20%", "10%"]
    assert len(warning) == 1 and "(style)" in warning[0]  # each page words its warning


# --------------------------------------------------------------------------------------------------
# one renderer for the CLI's text and JSON output
# --------------------------------------------------------------------------------------------------
def test_every_command_prints_through_emit():
    """No command writes its result by hand: ``print`` and ``--json`` are emit's alone (progress and errors go to
    stderr)."""
    import ast

    tree = ast.parse((ROOT / "tl_core" / "cli.py").read_text())
    offenders = []
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name not in ("emit", "_print_json")):
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("print", "_print_json"):
                offenders.append(f"{fn.name}:{node.lineno} {node.func.id}")
            if isinstance(node, ast.Attribute) and node.attr == "json" and getattr(node.value, "id", None) == "args":
                offenders.append(f"{fn.name}:{node.lineno} args.json")
    assert offenders == []


@pytest.mark.parametrize("command,line", [(["settings"], "TL_CACHE_MAX_GB"), (["data", "list"], "no datasets"),
                                          (["backbones"], "efficientnet_lite0")])
def test_emit_prints_one_json_document_or_text(command, line, tmp_path, monkeypatch, capsys):
    import json

    from tl_core.cli import main

    monkeypatch.setenv("TL_HOME", str(tmp_path / "home"))
    assert main(command + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # exactly one document: anything else fails to parse
    assert isinstance(doc, list)
    assert main(command) == 0
    text = capsys.readouterr().out
    assert line in text and not text.lstrip().startswith(("[", "{"))
