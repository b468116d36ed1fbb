"""The small sentences of issue 24's walk ("each a sentence a user read"): what the time left counts, what a
click on Cancel shows at once, what the advisor claims, which version is the current one, and the report's words.

Fast tier: plain functions and page runs (``AppTest``) on an empty workspace with a run or dataset made in place;
no worker process starts.
"""

from __future__ import annotations

import os

import pytest

from page_harness import (  # noqa: F401  (fixtures are used by name)
    app,
    assert_clean,
    button,
    empty_home,
    no_workers,
)
from tl_core.share.progress import describe_progress
from tl_core.storage.processes import identity

EMOJI = os.path.join(os.path.dirname(__file__), "..", "sample_data", "emoji")


# --------------------------------------------------------------------------------------------------
# (1) the time left, and Cancel
# --------------------------------------------------------------------------------------------------
def _epochs(n: int, first: float = 30.0, rest: float = 10.0, val: float = 3.0) -> list[dict]:
    """The probe's epoch 0 (a validation pass of ``val`` s), then ``n`` epochs: a slow first one, then ``rest`` s."""
    out = [{"epoch": 0, "seconds": val, "probe": True, "best": True}]
    for i in range(1, n + 1):
        s = first if i == 1 else rest
        out.append({"epoch": i, "seconds": s, "train_seconds": s - val, "best": False})
    return out


def test_time_left_counts_the_final_evaluation_and_paces_by_the_later_epochs():
    # 3 of 8 epochs done (30 s, 10 s, 10 s); 5 to go at 10 s, then the final evaluation (a 3 s validation pass)
    _, text = describe_progress("running", {"stage": "epoch", "epoch": 3, "epochs": 8}, _epochs(3))
    assert text.endswith("about 53 s left"), text
    # inside epoch 4 of 8: the engine's steps left (its pace this epoch, 40 s), then a validation pass after each
    # of the 5 epochs still running (epoch 4's included), then the final evaluation (as between epochs): 40 + 6 x 3
    _, text = describe_progress("running", {"stage": "train", "epoch": 4, "epochs": 8, "step": 5, "steps": 10,
                                            "done": 35, "total": 80, "eta_s": 40}, _epochs(3))
    assert text.endswith("about 58 s left"), text
    # the first epoch has nothing better than the step rate: it gets the evaluations still to come added (2 + 1)
    _, text = describe_progress("running", {"stage": "train", "epoch": 1, "epochs": 2, "step": 5, "steps": 10,
                                            "done": 5, "total": 20, "eta_s": 20}, _epochs(0))
    assert text.endswith("about 29 s left"), text


def test_time_left_says_when_early_stopping_may_end_the_run_sooner():
    # best was the probe (epoch 0); patience 4 stops it after epoch 4 unless an epoch improves: 1 epoch + eval
    _, text = describe_progress("running", {"stage": "epoch", "epoch": 3, "epochs": 8}, _epochs(3), patience=4)
    assert text.endswith("about 53 s left (13 s if early stopping ends it now)"), text
    # no patience (0): no second figure
    _, text = describe_progress("running", {"stage": "epoch", "epoch": 3, "epochs": 8}, _epochs(3), patience=0)
    assert "early stopping" not in text


def test_evaluating_the_best_checkpoint_shows_the_time_it_takes(monkeypatch):
    import time

    monkeypatch.setattr(time, "time", lambda: 1000.0)
    _, text = describe_progress("running", {"stage": "evaluate", "time": 999.0}, _epochs(2, val=9.0))
    assert text == "Evaluating the best checkpoint · about 8 s left", text


def test_a_pending_cancel_is_said_on_the_progress_line():
    _, text = describe_progress("running", {"stage": "epoch", "epoch": 3, "epochs": 8}, _epochs(3), cancelling=True)
    assert text.startswith("Cancelling…") and "left" not in text


def test_cancel_training_says_cancelling_on_the_click_itself(empty_home, no_workers):
    ws = empty_home
    store = ws.store()
    run_id = store.create_run(os.path.abspath(EMOJI), {"backbone": "efficientnet_lite0", "strategy": "partial",
                                                       "epochs": 8, "patience": 4}, status="running")
    pid, start = identity()  # "its worker" is this live process: the page's recovery leaves the run running
    store.update(run_id, pid=pid, pid_start=start, progress={"stage": "epoch", "epoch": 1, "epochs": 8})
    at = app({"run": run_id})
    at.switch_page("pages/train.py").run()
    assert_clean(at)
    assert not any("Cancelling" in p.proto.text for p in at.get("progress"))
    button(at, "Cancel training").click().run()  # one rerun: the click's own
    assert_clean(at)
    assert any(p.proto.text.startswith("Cancelling…") for p in at.get("progress")), [p.proto.text for p in at.get("progress")]
    assert store.get(run_id)["cancel_requested"]
    assert button(at, "Cancel training").disabled


# --------------------------------------------------------------------------------------------------
# (2) the advisor claims no reuse training does not make
# --------------------------------------------------------------------------------------------------
def test_the_advisor_does_not_promise_that_training_reuses_its_features(empty_home, no_workers):
    at = app({"data": "sample/emoji"})
    at.switch_page("pages/backbone.py").run()
    assert_clean(at)
    said = " ".join(c.value for c in at.caption)
    assert "Before any training, each backbone looks at a sample" in said  # the advisor's section is drawn
    assert "training computes its own" in said and "reuses" not in said, said


# --------------------------------------------------------------------------------------------------
# (4) the versions list: which one is current, and the expander stays open after Restore
# --------------------------------------------------------------------------------------------------
def _managed_emoji(ws) -> tuple[str, str, str]:
    """A workspace copy of the emoji sample with two versions: (name, first id, second id)."""
    from tl_core.data import versions

    name, _ = versions.dataset_for_changes(ws, EMOJI)
    first = versions.current_version(ws, name)
    one = sorted(os.listdir(os.path.join(EMOJI, "animal")))[0]
    second = versions.exclude_images(ws, name, [f"animal/{one}"], why="a test")["version"]
    assert second != first
    return name, first, second


def test_the_versions_table_marks_the_current_version_and_its_earlier_twin(empty_home):
    from pages._fix import history_rows
    from tl_core.data import versions

    name, first, second = _managed_emoji(empty_home)
    versions.restore_version(empty_home, name, first)
    rows = history_rows(versions.history(empty_home, name))
    assert [(r["version"], r["state"]) for r in rows] == [(first, "current"), (second, ""), (first, "same as current")]


def test_the_versions_expander_stays_open_after_restore(empty_home, no_workers):
    from tl_core.data import versions

    name, first, second = _managed_emoji(empty_home)
    at = app({"data": f"workspace/{name}"})
    at.switch_page("pages/data.py").run()
    assert_clean(at)
    panel = next(e for e in at.expander if e.label.startswith(f"Versions of '{name}'"))
    assert not panel.proto.expanded  # closed until used
    at.selectbox(key=f"restore_pick_{name}").set_value(first).run()
    button(at, "Restore").click().run()
    assert_clean(at)
    assert versions.current_version(empty_home, name) == first
    panel = next(e for e in at.expander if e.label.startswith(f"Versions of '{name}'"))
    assert panel.label == f"Versions of '{name}' (3)" and panel.proto.expanded
    table = [d.value for d in at.dataframe if "change" in d.value.columns][0]
    assert list(table["state"]) == ["current", "", "same as current"]


# --------------------------------------------------------------------------------------------------
# (7) a phone (390 px): a Start button above the settings
# --------------------------------------------------------------------------------------------------
def test_a_phone_gets_a_start_button_above_the_settings_that_starts_the_same_run(empty_home, no_workers):
    at = app({"data": "sample/emoji"})
    at.switch_page("pages/train.py").run()
    assert_clean(at)
    starts = [b for b in at.button if b.label == "Start training"]
    assert [b.key for b in starts][0] == "start-phone" and len(starts) == 2  # the phone's first, then the usual one
    css = " ".join(h.proto.body for h in at.get("html"))
    assert ".st-key-phone-start{display:none}" in css and "@media (max-width:640px)" in css
    at.button(key="start-phone").click().run()
    assert_clean(at)
    runs = empty_home.store().list()
    assert len(runs) == 1 and runs[0]["config"]["strategy"] == "auto" and runs[0]["status"] == "queued"


def test_side_by_side_chart_titles_fit_half_a_phone_screen():
    from tl_core.share import figures

    rows = [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 1.1 / (e + 1), "train_acc": 0.5, "val_acc": 0.6}
            for e in range(3)]
    advice = [{"backbone": b, "logme": s, "probe_accuracy": 0.8, "knn_accuracy": 0.7}
              for b, s in (("a", 1.0), ("b", 0.5))]
    lab = [{"arm": "linear", "images_per_class": n, "train_images": 5 * n, "val_accuracy": 0.7, "seconds": 1.0}
           for n in (5, 10)]
    charts = [figures.training_curves({"run": rows}), figures.advisor_scores(advice), figures.learning_curve(lab, 5)]
    for fig in charts:
        titles = [a.text for a in fig.layout.annotations if a.yref == "paper" and a.text]
        assert len(titles) >= 2
        for t in titles:
            assert max(len(line) for line in t.split("<br>")) <= figures.TITLE_LINE, t


def test_the_runs_table_has_a_heading_of_its_own_for_its_toolbar(empty_home, no_workers):
    store = empty_home.store()
    store.create_run(os.path.abspath(EMOJI), {"backbone": "efficientnet_lite0", "strategy": "linear"}, status="failed")
    at = app()
    at.switch_page("pages/runs.py").run()
    assert_clean(at)
    order: list[str] = []

    def walk(node) -> None:  # the page's elements in order; an expander as one
        for child in getattr(node, "children", {}).values():
            kind = getattr(child, "type", None)
            if kind == "expander":
                order.append("expander")
            elif kind in ("subheader", "dataframe", "markdown", "header", "title", "caption"):
                order.append(kind)
            else:
                walk(child)

    walk(at.main)
    assert "dataframe" in order, order
    table = order.index("dataframe")
    # the table's toolbar floats over the element before it: a heading, never the Cache expander
    assert order[table - 1] == "subheader", order
    assert any(h.value == "All runs (1)" for h in at.subheader)


# --------------------------------------------------------------------------------------------------
# (3) already true before this branch: Home names the backbone the shown run used; Runs names its clock
# --------------------------------------------------------------------------------------------------
def test_home_says_which_backbone_the_shown_run_used_beside_the_default(empty_home, no_workers):
    run_id = empty_home.store().create_run(os.path.abspath(EMOJI), {"backbone": "efficientnet_lite1",
                                                                    "strategy": "linear"}, status="failed")
    at = app({"run": run_id})
    assert_clean(at)
    text = " ".join(m.value for m in at.markdown)
    assert "Not chosen: the next run uses the default efficientnet_lite0" in text
    assert f"Run {run_id} used efficientnet_lite1." in text


def test_the_end_of_a_run_says_which_pass_it_is_in_and_its_time_left():
    # the open-set bank's pass counts its images: its own time left, in its own words
    _, text = describe_progress("running", {"stage": "evaluate", "message": "Recording the training images' features "
                                            "(open-set score)", "done": 40, "total": 160, "eta_s": 30}, _epochs(2))
    assert text == "Recording the training images' features (open-set score): 40/160 images · about 30 s left", text
    # nothing to time it by (no epoch yet, no time recorded): no figure, and no error
    _, text = describe_progress("running", {"stage": "evaluate", "message": "Evaluating the best checkpoint"})
    assert text == "Evaluating the best checkpoint", text
