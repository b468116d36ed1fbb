"""The Train form shows what the server holds, even when the browser forgets: every generated widget (and the
strategy radio) carries the value it holds as its own default, which is what Streamlit's frontend draws when it
drops a widget's state (it does after the run panel's fragment calls ``st.rerun`` at the end of a run: the CI
screenshot showed "Linear probe" and a time budget of 10 over an auto run's settings of 120 s)."""

from __future__ import annotations

from page_harness import app, assert_clean, empty_home, goto, no_workers  # noqa: F401

from tl_core.config import config_fields

WIDGETS = ("number_input", "select_slider", "slider", "radio", "selectbox", "toggle")


def _default_is_the_value(w) -> bool:
    """Whether what the browser draws for a widget whose state it dropped (the widget's own default) is the value
    the server holds."""
    d = w.proto.default
    if w.type in ("radio", "selectbox"):
        return d == w.index
    if w.type == "select_slider":  # options as the page formats them
        return w.options[int(d[0])] == (f"{w.value:g}" if isinstance(w.value, float) else str(w.value))
    if w.type == "slider":
        return list(d) == [w.value]
    return d == w.value


def _form(at) -> dict:
    return {w.label: w for kind in WIDGETS for w in at.get(kind) if hasattr(w, "label")}


def test_every_form_widget_defaults_to_the_value_the_server_holds(empty_home, no_workers):
    at = goto(app({"data": "sample/emoji"}), "train")
    assert_clean(at)
    _form(at)["Strategy"].set_value("partial").run()
    _form(at)["Augmentation"].set_value("strong")
    _form(at)["Seed"].set_value(7).run()
    _form(at)["Strategy"].set_value("auto").run()
    _form(at)["Time budget (seconds)"].set_value(300).run()
    assert_clean(at)
    labels = {f.label for f in config_fields() if f.section} | {"Strategy"}
    for strategy in ("auto", "linear", "partial"):
        _form(at)["Strategy"].set_value(strategy).run()
        assert_clean(at)
        form = _form(at)
        for label in labels:
            assert _default_is_the_value(form[label]), (strategy, label, form[label].value, form[label].proto.default)
        assert form["Strategy"].value == strategy
        assert form["Time budget (seconds)"].value == 300  # kept, and disabled where unused
        assert form["Time budget (seconds)"].disabled == (strategy != "auto")
