"""Data: choose a sample dataset, upload a zip, or build a dataset class by class; rename or delete an uploaded
one; see its report."""

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from pages import _access as access
from pages import _fix as fixes
from pages import _map_view as map_view
from pages import _session as session
from pages import _tasks as task_ui
from tl_core.runs import tasks
from tl_core.config import CLASS_BALANCE, field_help
from tl_core.data.images import IMAGE_EXTENSIONS
from tl_core.data.library import add_class_images, dataset_signature, safe_name
from tl_core.runs import datasets
from tl_core.runs.datasets import dataset_runs, dataset_users, delete_dataset, rename_dataset
from tl_core.data import versions
from tl_core.access import AccessError
from tl_core.errors import DatasetError, TLError
from tl_core.share import figures as charts

session.ensure_router()

st.title("Data")
st.caption("A dataset is a set of images sorted into one folder per class: `cats/1.jpg`, `dogs/7.png`, … "
           "Choose one below, or bring your own.")

IMAGE_TYPES = sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)
CLASSES_TAB, CAMERA_TAB = "Add images class by class", "Take pictures"


def _once(upload_id: str) -> bool:
    """True the first time an upload is seen: the uploader keeps its file across reruns."""
    seen = st.session_state.setdefault("_handled_uploads", set())
    if upload_id in seen:
        return False
    seen.add(upload_id)
    return True


def _flash(message: str, warnings: list[str] | None = None) -> None:
    """Keep a message for the next run (the page reruns right after an upload to show the new dataset)."""
    st.session_state["_data_flash"] = (message, warnings or [], time.monotonic())


#: The audit's near-duplicate and label checks look at up to this many images per class (exact duplicates,
#: imbalance and odd images always cover all of them); the embedding map draws up to this many.
AUDIT_MAX_PER_CLASS = 200
MAP_MAX_PER_CLASS = 200
GAP_MAX_PER_CLASS = 50


def _apply_balance(choice: str) -> None:
    """The audit's one-click imbalance fix: the Train form's class balance (a button callback)."""
    session.keep("class_balance", choice)
    st.session_state.pop("w_class_balance", None)  # the Train form re-reads the setting when next drawn
    st.session_state["_balance_flash"] = choice


def _name(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def _thumbs(paths: list[str], captions: list[str], width: int = 96) -> None:
    shown = [(p, c) for p, c in zip(paths, captions) if Path(p).is_file()]
    if shown:
        st.image([p for p, _ in shown], width=width, caption=[c for _, c in shown])


def _copies_to_exclude(ws, data: str, groups: list[list[str]]) -> list[str]:
    """The images of exact-duplicate groups to exclude so that each group keeps one image in the current version:
    all but the first image each group still holds (an image already excluded by hand stays out)."""
    rows = fixes.current_rows(ws, data)
    out = []
    for g in groups:
        out += [p for p in g if not fixes.is_excluded(ws, rows, p)][1:]
    return out


def _keep_one_of_each(ws, data: str, paths: list[str]) -> None:
    """Bulk fix (a button callback): exclude the copies :func:`_copies_to_exclude` found."""
    fixes.apply(ws, data, "exclude", paths, why="exact duplicates: one of each kept", follow=True)


def show_audit(audit: dict, ws, data: str, classes: list[str]) -> None:
    """The audit's findings, each with the images concerned and one-click fixes (exclude, move to a class)."""
    leaks, exact, near = audit["leakage"], audit["exact_duplicates"], audit["near_duplicates"]
    issues, odd, imb = audit["label_issues"], audit["odd_images"], audit["imbalance"]
    problems = bool(leaks or exact or near or issues or odd or imb["imbalanced"])
    for line in audit["findings"]:
        (st.warning if problems and not line.startswith("No problems") else st.success)(line)
    m = st.columns(6)
    m[0].metric("Leaks into validation", len(leaks), help="Validation/test images that are copies of training "
                "images: they make validation accuracy look better than it is.")
    m[1].metric("Exact duplicates", sum(len(g["paths"]) - 1 for g in exact), help="Files with identical contents.")
    m[2].metric("Near duplicates", len(near), help="Pairs that are the same picture resized, re-encoded or "
                "retouched (feature similarity confirmed by a pixel check).")
    m[3].metric("Likely label errors", len(issues), help="Images that a probe trained without them confidently "
                "puts in another class (confident learning: another class above its own average confidence, the "
                "given one below its own). On data where that probe is weak, only the near-certain ones.")
    m[4].metric("Tiny or blank", len(odd), help="Images far smaller than the others, or a single colour.")
    m[5].metric("Imbalance", f"{imb['ratio']:.1f}×", help="Training images of the largest class divided by the "
                "smallest.")
    check = audit.get("label_check")
    if check and not check["reliable"]:
        st.info(f"**Label check: not reliable on this data.** {check['reason']}", icon=":material/help:")
    elif check:
        st.caption(check["reason"])
    st.caption(f"Checked {audit['images']} images ({audit['audited_images']} for near duplicates and labels) with "
               f"{audit['backbone']} features in {audit['seconds']:.1f} s, for the split you will train with "
               f"(validation share {audit['thresholds']['val_split']:.0%}, seed {audit['thresholds']['seed']}).")

    if imb["imbalanced"]:
        fix = imb["suggestion"]
        c1, c2 = st.columns([3, 2])
        c1.warning(f"**Class imbalance.** {imb['reason']}")
        if session.setting("class_balance", "none") == fix:
            c2.success(f"Training will use **{CLASS_BALANCE[fix].label}** (set in the Train form).")
        else:
            c2.button(f"Fix it: use {CLASS_BALANCE[fix].label.lower()} when training", on_click=_apply_balance,
                      args=(fix,), type="primary", icon=":material/balance:", help=CLASS_BALANCE[fix].help)
    if "_balance_flash" in st.session_state:
        choice = st.session_state.pop("_balance_flash")
        st.success(f"Class balance set to **{CLASS_BALANCE[choice].label}** for your next training run.")
        session.link("train", "Go to Train", ":material/model_training:")

    if leaks:
        with st.expander(f"Validation images that leak from training ({len(leaks)})", expanded=True,
                         icon=":material/warning:"):
            st.caption("Each pair: the validation (or test) image, then the training image it copies. Exclude one of "
                       "them before training.")
            fixes.fixable_images(ws, data, [it for r in leaks[:12] for it in (
                {"path": r["held_out"], "label": r.get("label_held_out") or Path(r["held_out"]).parent.name,
                 "caption": f"{r['split']}: {_name(r['held_out'])}", "why": "leaked into validation"},
                {"path": r["train"], "label": r.get("label_train") or Path(r["train"]).parent.name,
                 "caption": f"train: {_name(r['train'])} ({r['kind']}, {r['similarity']:.3f})",
                 "why": "leaked into validation"})], classes, "leak", per_row=4, follow=True)
    if exact:
        with st.expander(f"Exact duplicates ({len(exact)} group(s))", expanded=len(exact) <= 5):
            extra = _copies_to_exclude(ws, data, [g["paths"] for g in exact])
            copies = len(extra)
            if copies:
                st.button(f"Keep one of each group (exclude {copies} {'copy' if copies == 1 else 'copies'})",
                          key="keep_one_each", on_click=_keep_one_of_each, args=(ws, data, extra),
                          icon=":material/filter_1:", type="primary",
                          help="One new version of the dataset in which each group of identical files keeps its "
                               "first image only.")
            else:
                st.caption("The current version keeps one image of each group.")
            for n, g in enumerate(exact[:20]):
                note = " — **different labels!**" if g["conflicting_labels"] else ""
                st.markdown(f"{len(g['paths'])} identical files{note}")
                fixes.fixable_images(ws, data, [{"path": p, "label": lab, "caption": f"{lab}: {_name(p)}",
                                               "why": "exact duplicate"} for p, lab in zip(g["paths"], g["labels"])],
                                   classes, f"exact-{n}", width=80, follow=True)
    if near:
        with st.expander(f"Near duplicates ({len(near)} pair(s))", expanded=len(near) <= 5):
            for n, r in enumerate(near[:20]):
                fixes.fixable_images(ws, data, [
                    {"path": r["a"], "label": r["label_a"], "caption": f"{r['label_a']}: {_name(r['a'])}",
                     "why": "near duplicate"},
                    {"path": r["b"], "label": r["label_b"], "why": "near duplicate",
                     "caption": f"{r['label_b']}: {_name(r['b'])} (similarity {r['similarity']:.3f})"}],
                    classes, f"near-{n}", width=80, follow=True)
    if issues:
        with st.expander(f"Likely label errors ({len(issues)})", expanded=True):
            st.caption("A linear probe that never saw these images is confident they belong to another class "
                       "(most confident first). Some are real mistakes in the labels; others are just hard images. "
                       "Look at each.")
            fixes.fixable_images(ws, data, [
                {"path": r["path"], "label": r["label"], "suggested": r["suggested"], "why": "likely label error",
                 "caption": f"labelled {r['label']}, looks like {r['suggested']} ({r['confidence']:.0%})"}
                for r in issues[:24]], classes, "label", width=110, per_row=4, follow=True)
    if odd:
        with st.expander(f"Tiny or blank images ({len(odd)})", expanded=len(odd) <= 10):
            fixes.fixable_images(ws, data, [{"path": r["path"], "label": r["label"], "why": r["reason"],
                                           "caption": f"{r['label']}: {_name(r['path'])} — {r['reason']}"}
                                          for r in odd[:30]], classes, "odd", follow=True)
    if audit["lookalikes"]:
        with st.expander(f"Different images that look almost alike ({len(audit['lookalikes'])} pair(s))"):
            st.caption("Usually fine (distinct pictures of similar things); a problem only when one is a crop or "
                       "edit of the other.")
            for r in audit["lookalikes"][:10]:
                _thumbs([r["a"], r["b"]], [f"{r['label_a']}: {_name(r['a'])}",
                                          f"{r['label_b']}: {_name(r['b'])} ({r['similarity']:.3f})"], 80)


def show_embedding_map(ws, path: Path, sig: str, backbone: str, seed: int) -> None:
    """The dataset's features in 2-D, coloured by class; a click shows the image."""
    st.subheader("Embedding map")
    method = st.radio("Projection", ["pca", "tsne"], horizontal=True, key="data_map_method",
                      format_func=lambda m: {"pca": "PCA (fast)", "tsne": "t-SNE (neighbourhoods, slower)"}[m],
                      help="PCA keeps the two directions along which the features vary most. t-SNE keeps images "
                           "that are close in feature space close on the map (distances between clusters mean "
                           "little).")
    params = {"data": str(path), "signature": sig, "backbone": backbone, "method": method,
              "max_per_class": MAP_MAX_PER_CLASS, "seed": int(seed)}
    res = task_ui.task_view(ws, "embedding_map", params, f"Drawing the embedding map ({method.upper()})", auto=True,
                          key=f"data-map-{method}")
    if res is None:
        return
    df = map_view.frame(res)
    st.caption(f"Each dot is an image, placed by what {backbone} sees in it: classes that form separate clusters "
               "are easy to tell apart; mixed clusters are where the model will make mistakes. Click a dot to see "
               "its image.")
    map_view.embedding_map_with_picker(df, f"data-map-{method}")


def show_domain_gap(ws, path: Path, sig: str, backbone: str, seed: int) -> None:
    """How far the images are from the backbone's pretraining photos, in plain language."""
    st.subheader("How far are these images from ImageNet?")
    params = {"data": str(path), "signature": sig, "backbone": backbone, "max_per_class": GAP_MAX_PER_CLASS,
              "seed": int(seed)}
    task = tasks.find(ws, "domain_gap", params)
    if task is not None and task.status == "failed" and "ImageNet head" in (task.error or ""):
        # a backbone without its ImageNet head (local weights): no hint, and nothing to retry
        st.info(f"No domain-gap hint for {backbone} here: {task.error}")
        return
    gap = task_ui.task_view(ws, "domain_gap", params, "Measuring the distance from ImageNet", auto=True,
                            key="data-gap")
    if gap is None:
        return
    icon = {"near": ":material/check_circle:", "moderate": ":material/info:", "far": ":material/explore:"}
    st.markdown(f"{icon.get(gap['level'], '')} **The domain gap is {gap['level']}** (the ImageNet head of {backbone} "
                f"is on average {gap['mean_max_softmax']:.0%} sure what an image shows).")
    st.info(gap["reading"])
    if gap.get("style_level"):  # results computed before the style part existed have none
        st.markdown(f"{icon.get(gap['style_level'], '')} **In style, the gap is {gap['style_level']}** (style gap "
                    f"{gap['style_gap']:.2f}: how far the images' colours, strokes and textures sit from the ImageNet "
                    f"statistics kept in {backbone}'s layers; with EfficientNet-Lite, colour photos measure about "
                    "0.27–0.29, emoji drawings 0.36–0.37, small gray clothes 0.40). " + gap["style_reading"])
    elif gap.get("style_note"):
        st.caption(gap["style_note"])
    left, right = st.columns([1, 1])
    with left:
        st.plotly_chart(charts.domain_gap(gap["per_class"], gap["levels"]), width="stretch", key="gap-chart")
        if gap.get("style_levels"):
            st.plotly_chart(charts.style_gap(gap["per_class"], gap["style_levels"]), width="stretch",
                            key="gap-style-chart")
    with right:
        st.caption("What the backbone's ImageNet head thinks each class shows (share of its images)"
                   + (", and each class's style gap; rank 1 is the most ImageNet-like class:" if gap.get("style_level")
                      else ":"))
        table = pd.DataFrame([{"class": c, "looks like (ImageNet)": ", ".join(
            f"{x['imagenet']} {x['share']:.0%}" for x in v["looks_like"][:2]), "style gap": v.get("style_gap"),
            "rank": v.get("rank")} for c, v in gap["per_class"].items()])
        if not gap.get("style_level"):
            table = table.drop(columns=["style gap", "rank"])
        else:
            table = table.sort_values("rank")
        st.dataframe(table, hide_index=True, width="stretch")
    if gap.get("style_level") and len(gap["per_class"]) > 1:
        ranked = sorted(gap["per_class"], key=lambda c: gap["per_class"][c]["rank"])
        st.caption(f"Most ImageNet-like class: **{ranked[0]}**; least: **{ranked[-1]}** (its images are the ones "
                   "the pretrained features describe least well: give it more images, or fine-tune).")
    if gap.get("most_imagenet_like"):
        for title, rows in (("Most ImageNet-like images", gap["most_imagenet_like"]),
                            ("Least ImageNet-like images", gap["least_imagenet_like"])):
            st.caption(f"{title} (ImageNet head sure · style gap):")
            cols = st.columns(len(rows))
            for col, r in zip(cols, rows):
                if Path(r["path"]).is_file():
                    col.image(r["path"], width=90)
                col.caption(f"{r['class']} · {r['max_softmax']:.0%} · {r['style_gap']:.2f}")


def data_check(ws, path: Path, val_split: float, seed: int, classes: list[str]) -> None:
    """The audit (before training), then the embedding map and the domain-gap hint it makes cheap."""
    st.header("Data check")
    backbone = session.get("backbone", session.DEFAULT_BACKBONE)
    st.caption(f"Before training: duplicates, validation images that leak from training, class imbalance, tiny "
               f"or blank images and likely wrong labels, found with the features of {backbone} (the backbone you "
               "chose; training reuses them).")
    fixes.show_flash()
    sig = dataset_signature(path)
    params = {"data": str(path), "signature": sig, "backbone": backbone, "val_split": float(val_split),
              "seed": int(seed), "max_per_class": AUDIT_MAX_PER_CLASS}
    if tasks.find(ws, "audit", params) is None:
        st.caption("Press **Check the data** for the audit, the embedding map and the domain-gap hint.")
    audit = task_ui.task_view(ws, "audit", params, "Checking the data", button="Check the data",
                              icon=":material/fact_check:", key="audit",
                              button_help="Computes the backbone's features of every image once (cached for "
                                          "training), then runs the checks. About a second per 10-20 images the "
                                          "first time; it runs on the server, so you may leave the page meanwhile.")
    # a fix makes a new version (a new signature): the check made before it stays in view, its images marked
    # with what the current version says of them, until the data is checked again; so do the embedding map and
    # the domain-gap hint of that check (not started again for every fix: two tasks per click, whose ends would
    # redraw the page while the user clicks on)
    last = f"_audit_{session.get('dataset')}"
    if audit is not None:
        st.session_state[last] = (audit, path, sig)
    check_path = path
    if audit is None and last in st.session_state:
        audit, check_path, sig = st.session_state[last]
        st.caption("Showing the check made before your last change; press **Check the data** to check the current "
                   "version (features are cached: it is quick).")
    if audit is None:
        return
    show_audit(audit, ws, str(path), classes)
    show_embedding_map(ws, check_path, sig, backbone, seed)
    show_domain_gap(ws, check_path, sig, backbone, seed)


#: The query parameter naming the upload's intake task: a refreshed page finds it again.
INTAKE_PARAM = "intake"


def _receive(ws, attempt: str, send) -> None:
    """Hand an upload to the engine once per ``attempt``: ``send()`` writes its bytes into the workspace and queues
    the intake task (a worker unpacks and checks it); the task's id goes into the page address. An upload refused
    before any task is said here: an empty file once (sending it again cannot help); a full queue each time it is
    tried, since the attempt is not used up: the file stays in the uploader and is sent again on the next run of
    the page (the button below, or any click)."""
    if not _once(attempt):
        return
    try:
        task = send()
    except DatasetError as e:
        st.error(f"{e} Nothing was saved.")
        return
    except tasks.QueueFullError as e:
        st.session_state["_handled_uploads"].discard(attempt)  # not sent: the next run of the page tries again
        st.error(f"{e} Your file stays here and is sent again when you press the button.")
        st.button("Send it again", key=f"resend-{abs(hash(attempt))}", icon=":material/refresh:")
        return
    st.query_params[INTAKE_PARAM] = task.id
    st.rerun()  # the task's progress (or its result) is drawn at the top of "Bring your own images"


def receive_zip(ws, up, labels) -> None:
    """Receive an uploaded zip (with the labels CSV when one is given), once per pair of files: its bytes are
    written into the workspace and a worker unpacks and checks them (:func:`intake_view` shows it).

    A zip that cannot make a dataset is refused by the task before anything is saved: one error, nothing in the
    list. Adding a labels CSV after such a refusal tries the same zip again with it.
    """
    attempt = f"{up.file_id}:{labels.file_id if labels is not None else ''}"
    if up.file_id in st.session_state.setdefault("_saved_zips", set()):
        return
    _receive(ws, attempt, lambda: datasets.receive_zip(
        ws, up.name, up.getvalue(), labels_csv=labels.getvalue() if labels is not None else None,
        val_split=session.setting("val_split", 0.2), seed=session.setting("seed", 0), owner=session.owner(),
        source={"from": "zip", "upload": up.file_id, "labels": labels is not None}))


def receive_folder(ws, files) -> None:
    """Receive an uploaded folder (class sub-folders), once per set of files: packed into a zip in the workspace,
    it goes through the same intake task as a zip (a folder that cannot make a dataset is refused, nothing saved)."""
    attempt = "folder:" + ",".join(sorted(f.file_id for f in files))
    _receive(ws, attempt, lambda: datasets.receive_folder(
        ws, [(f.name, f.getvalue()) for f in files], val_split=session.setting("val_split", 0.2),
        seed=session.setting("seed", 0), owner=session.owner(), source={"from": "folder", "files": len(files)}))


def forget_refusal(ws, uploader: str) -> None:
    """Drop a refused (or cancelled) upload from the page address once its uploader (``"zip"`` or ``"folder"``) is
    empty: the refusal stays in view while its file is there to fix, no longer. A task still running stays."""
    task_id = st.query_params.get(INTAKE_PARAM)
    if not task_id:
        return
    try:
        task = tasks.get(ws, task_id)
    except TLError:
        return
    if not task.active and task.status != "done" and (task.params.get("source") or {}).get("from") == uploader:
        del st.query_params[INTAKE_PARAM]


def intake_view(ws) -> None:
    """The upload being unpacked and checked (the task in the page address): its place in the queue and progress
    while it runs, its one-sentence refusal when it failed, and, when it is done, the new dataset chosen."""
    task_id = st.query_params.get(INTAKE_PARAM)
    if not task_id:
        return
    try:
        task = tasks.get(ws, task_id)
    except TLError:  # forgotten (pruned), or another workspace's address
        del st.query_params[INTAKE_PARAM]
        return
    source = task.params.get("source") or {}
    name = task.params.get("name", "the upload")
    if task.status == "done":
        res = task_ui.result(ws, task)
        del st.query_params[INTAKE_PARAM]
        if source.get("from") == "folder":
            st.session_state["_folder_uploads"] = st.session_state.get("_folder_uploads", 0) + 1  # an empty uploader
            _flash(f"Saved the uploaded folder ({source.get('files', '?')} files) as dataset '{res['dataset']}'.")
        else:
            st.session_state.setdefault("_saved_zips", set()).add(source.get("upload"))
            _flash(f"Unpacked {name} as dataset '{res['dataset']}'.")
        session.select("dataset", session.dataset_ref_for_path(Path(res["path"]), ws))
        st.rerun()
    if task.status in ("failed", "interrupted"):
        error = task.error or f"Unpacking {name} failed."
        hint = (" If the images are not sorted into class folders, give their labels in a CSV (Advanced, below)."
                if source.get("from") == "zip" and not source.get("labels") and error.startswith("No classes found")
                else "")
        st.error(f"{error} Nothing was saved.{hint}")
        return
    if task.status == "cancelled":
        st.caption(f"Unpacking {name}: cancelled, nothing was saved. Upload it again when you like.")
        return
    task_ui.task_view(ws, "intake", task.params, f"Unpacking and checking {name}", key="intake")


def _rename(ws, name: str) -> None:
    """Button callback: rename the chosen uploaded dataset (before the page is drawn, so the picker follows)."""
    try:
        folder = rename_dataset(ws, name, st.session_state.get("rename_to", ""), actor=access.actor())
    except (DatasetError, AccessError) as e:
        st.session_state["_manage_error"] = str(e)
        return
    session.select("dataset", f"workspace/{folder.name}")
    st.session_state["rename_to"] = ""  # empty the field (a callback may set its widget)
    if folder.name != name:
        _flash(f"Renamed dataset '{name}' to '{folder.name}'.")


def _delete(ws, name: str) -> None:
    """Button callback: delete the chosen uploaded dataset (refused while a run or task reads it)."""
    try:
        kept = delete_dataset(ws, name, actor=access.actor())
    except (DatasetError, AccessError) as e:
        st.session_state["_manage_error"] = str(e)
        return
    session.select("dataset", None)
    st.session_state.pop("confirm_delete_dataset", None)
    _flash(f"Deleted dataset '{name}' and its images."
           + (f" The {kept} run(s) trained on it are kept with their results; their views can no longer show its "
              "images." if kept else ""))


def _restore(ws, name: str, version: str) -> None:
    """Button callback: make the chosen earlier version the current one."""
    fixes.keep_versions_open(name)  # the expander's label changes (one more version): keep it open
    try:
        entry = versions.restore_version(ws, name, version)
    except DatasetError as e:
        st.session_state["_manage_error"] = str(e)
        return
    _flash(f"Restored version {entry['version']} of '{name}' as its current version "
           f"({entry['counts']['images']} images). The versions before it are kept.")


def versions_panel(ws, ref: str) -> None:
    """The chosen dataset's versions, newest first, and restoring an earlier one."""
    if not ref.startswith("workspace/"):
        st.caption("Sample datasets do not change: excluding or moving an image (from the data check or Evaluate) "
                   "first makes a managed copy in the workspace, with versions.")
        return
    name = ref.split("/", 1)[1]
    if not versions.is_managed(ws, name):
        return
    hist = versions.history(ws, name)
    with st.expander(f"Versions of '{name}' ({len(hist)})", icon=":material/history:",
                     expanded=fixes.versions_open(name)):
        st.caption("Every change (an image excluded, moved to another class, images added) is a new version; runs "
                   "record the version they trained on. Nothing is deleted: restore any version. A version's id "
                   "is a fingerprint of its images and labels: a restore brings an earlier id back.")
        st.dataframe(pd.DataFrame(fixes.history_rows(hist)), hide_index=True, width="stretch",
                     column_config={"state": st.column_config.TextColumn(width="small")})
        older = list(dict.fromkeys(h["version"] for h in hist[1:] if h["version"] != hist[0]["version"]))
        if older:
            c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
            pick = c1.selectbox("Earlier version", older, key=f"restore_pick_{name}",
                                format_func=lambda v: next(f"{v} · {h['change']}" for h in hist if h["version"] == v))
            c2.button("Restore", key=f"restore_{name}", on_click=_restore, args=(ws, name, pick),
                      icon=":material/restore:", help="Makes a new version equal to the one chosen.")


def manage_dataset(ws, ref: str) -> None:
    """Rename or delete the chosen uploaded dataset (sample datasets ship with TL Studio and stay)."""
    if not ref.startswith("workspace/"):
        return
    name = ref.split("/", 1)[1]
    busy = "_manage_error" in st.session_state or st.session_state.get("confirm_delete_dataset")
    with st.expander(f"Manage '{name}': rename or delete", icon=":material/edit:", expanded=bool(busy),
                     key=f"manage_{name}"):
        if "_manage_error" in st.session_state:
            st.error(st.session_state.pop("_manage_error"))
        users = dataset_users(ws, name)
        runs = dataset_runs(ws, name)
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        c1.text_input("New name", key="rename_to", placeholder=name,
                      help="Letters, digits, '-', '_' and '.'; other characters become '_'.")
        c2.button("Rename", key="rename_dataset", on_click=_rename, args=(ws, name), icon=":material/edit:",
                  disabled=bool(users))
        if users:
            st.warning(f"'{name}' is in use by {', '.join(users)}: it cannot be renamed or deleted until that has "
                       "finished (cancel a run on the Train page).")
        done = [r for r in runs if r["status"] not in ("queued", "running")]
        if done:
            st.caption(f"{len(done)} run(s) trained on '{name}'. Renaming it keeps them, and their image views "
                       "follow it to its new name; deleting it keeps them and their results, but their image views "
                       "(mistakes, Grad-CAM) will not find its pictures.")
        sure = st.checkbox(f"Yes, delete '{name}' and its images from this server", key="confirm_delete_dataset",
                           disabled=bool(users))
        st.button("Delete dataset", key="delete_dataset", on_click=_delete, args=(ws, name), icon=":material/delete:",
                  disabled=not sure or bool(users), type="primary" if sure and not users else "secondary")


def capture(ws) -> None:
    """Class-by-class webcam capture into a new or existing dataset: each picture is saved as it is taken (a new
    version of a versioned dataset), with a counter per class."""
    st.caption("Take pictures with this device's camera (the browser asks first): name the class, take its pictures "
               "one click each, then the next class. At least two classes, 10+ pictures each recommended.")
    current = session.get("dataset") or ""
    c1, c2 = st.columns(2)
    name = c1.text_input("Dataset name", key="cap_name",
                         value=current.split("/", 1)[1] if current.startswith("workspace/") else "my_camera",
                         help="A new name starts a new dataset; the name of one of your datasets adds to it.")
    cls = c2.text_input("Class name", key="cap_class", placeholder="e.g. thumbs_up",
                        help="The label of the pictures you take now.")
    counts = versions.class_counts(ws, safe_name(name)) if name.strip() else {}
    if counts:
        cols = st.columns(min(len(counts), 6))
        for n, (c, k) in enumerate(counts.items()):
            cols[n % len(cols)].metric(f"{c}", k, help="Pictures of this class in the dataset so far.")
    if not cls.strip():
        st.info("Name the class first, then take its pictures.")
        return
    n_shots = st.session_state.setdefault("_cap_shots", 0)
    # a new key after each picture: the camera is ready for the next one at once
    shot = st.camera_input(f"Take a picture of '{cls}'", key=f"cap_cam_{n_shots}")
    if shot is not None and _once(f"cap:{shot.file_id}"):
        try:
            folder, saved, _ = add_class_images(ws, name, cls, [(f"cam_{time.time_ns()}.jpg", shot.getvalue())])
        except DatasetError as e:
            st.error(str(e))
            return
        st.session_state["_cap_shots"] = n_shots + 1
        st.session_state["_building_tab"] = CAMERA_TAB
        session.select("dataset", session.dataset_ref_for_path(folder, ws))
        _flash(f"Saved a picture of '{safe_name(cls, fallback='class')}' in '{folder.name}'.")
        st.rerun()


with session.page_errors():
    # one slot, drawn on every run: a message that shows once does not shift what follows (Streamlit would
    # otherwise take the expanders below for new ones and close them on the next rerun)
    with st.container():
        if "_data_flash" in st.session_state:
            # shown on every run for a few seconds (see fixes.FLASH_SECONDS), then dropped
            message, warnings, when = st.session_state["_data_flash"]
            if time.monotonic() - when > fixes.FLASH_SECONDS:
                del st.session_state["_data_flash"]
            else:
                st.success(message)
                for w in warnings:
                    st.warning(w)
    ws = session.workspace()
    options = session.dataset_options(ws)
    refs = list(options)
    st.selectbox(
        "Dataset", refs, key=session.bind("dataset", refs), on_change=session.picked, args=("dataset",),
        format_func=lambda r: options[r], placeholder="Choose a dataset",
        help="Sample datasets ship with TL Studio; uploaded ones are kept in the workspace on this server.",
    )

    chosen = session.dataset_path(session.get("dataset"), ws) is not None
    if chosen:
        manage_dataset(ws, session.get("dataset"))
        versions_panel(ws, session.get("dataset"))
    # stay open while a dataset is built class by class or picture by picture
    building = st.session_state.get("_class_uploads", 0) > 0 or st.session_state.get("_cap_shots", 0) > 0
    receiving = INTAKE_PARAM in st.query_params
    with st.expander("Bring your own images", expanded=not chosen or building or receiving, icon=":material/upload:"):
        with st.container():  # one slot, drawn on every run: what it shows does not move the tabs below
            intake_view(ws)
        # the tab a dataset is being built in stays selected: the first picture or images make a dataset, and the
        # panels that then show above would otherwise redraw the tabs on their first one
        tab_zip, tab_folder, tab_classes, tab_camera = st.tabs(
            ["Upload a zip", "Upload a folder", CLASSES_TAB, CAMERA_TAB], default=st.session_state.get("_building_tab"))
        with tab_zip:
            st.caption("A .zip holding one folder per class (`cats/1.jpg`, `dogs/7.png`, …; sub-folders `train/`, "
                       "`val/`, `test/` with class folders inside are understood too). Files that are not images "
                       "are skipped and listed. A zip that cannot make a dataset (one class only, no images) is "
                       "refused and nothing is saved.")
            up = st.file_uploader("Dataset .zip", type=["zip"], key="zip_upload",
                                  help=session.upload_note("the zip") + " Unpacked safely into the workspace's "
                                       "datasets folder.")
            st.caption(session.upload_note("each file"))
            labels = None
            if st.toggle("Advanced: the labels are in a separate CSV", key="use_labels_csv",
                         help="Only when the images are not sorted into class folders (a single .csv inside the zip "
                              "is found by itself)."):
                st.caption("A CSV of `path,label` rows, one per image, paths relative to the zip's top folder. Add "
                           "it before or after the zip: the zip is unpacked again with it.")
                labels = st.file_uploader("Labels CSV (optional)", type=["csv"], key="csv_upload",
                                          help="One 'path,label' row per image. " + session.upload_note())
            if up is not None:
                receive_zip(ws, up, labels)
            else:
                forget_refusal(ws, "zip")

        with tab_folder:
            st.caption("A folder on your computer holding one sub-folder of images per class (`pets/cats/1.jpg`, "
                       "`pets/dogs/7.png`, …; `train/`, `val/`, `test/` with class folders inside are understood "
                       "too). It is checked like a zip: one that cannot make a dataset is refused and nothing is "
                       "saved.")
            n_folders = st.session_state.setdefault("_folder_uploads", 0)
            picked = st.file_uploader("Dataset folder", type=IMAGE_TYPES + ["csv"], accept_multiple_files="directory",
                                      key=f"folder_upload_{n_folders}",
                                      help="Choose the folder itself (the browser uploads every image in it and "
                                           "its sub-folders). " + session.upload_note())
            if picked:
                receive_folder(ws, picked)
            else:
                forget_refusal(ws, "folder")

        with tab_classes:
            st.caption("Build a dataset from images on your computer: name a class, add its images, repeat for "
                       "every class (at least two classes, 10+ images each recommended).")
            c1, c2 = st.columns(2)
            ds_name = c1.text_input("Dataset name", value="my_images", key="build_name",
                                    help="Letters, digits, '-', '_' and '.'; other characters become '_'.")
            cls_name = c2.text_input("Class name", key="build_class", placeholder="e.g. cats",
                                     help="The label these images get.")
            # a new key after each addition empties the uploader for the next class
            n_added = st.session_state.setdefault("_class_uploads", 0)
            files = st.file_uploader("Images of this class", type=IMAGE_TYPES, accept_multiple_files=True,
                                     key=f"class_upload_{n_added}", help=session.upload_note())
            st.caption(session.upload_note("each image"))
            if st.button("Add to dataset", disabled=not files):
                folder, saved, skipped = add_class_images(ws, ds_name, cls_name,
                                                          [(f.name, f.getvalue()) for f in files])
                _flash(f"Added {len(saved)} image(s) to class '{cls_name}' of '{folder.name}'.",
                       [f"{s['path']}: {s['reason']}" for s in skipped])
                session.select("dataset", session.dataset_ref_for_path(folder, ws))
                st.session_state["_class_uploads"] = n_added + 1
                st.session_state["_building_tab"] = CLASSES_TAB
                st.rerun()

        with tab_camera:
            capture(ws)

    path = session.dataset_path(session.get("dataset"), ws)
    if path is None:
        st.info("No dataset chosen yet. Tip: **emoji (sample data)** trains in seconds.")
        st.stop()

    val_split = session.setting("val_split", 0.2)
    seed = session.setting("seed", 0)
    try:
        rep = session.dataset_report(path, val_split, seed, ws)
    except DatasetError as e:
        if not str(e).startswith("Only one class") or not (session.get("dataset") or "").startswith("workspace/"):
            raise
        # a dataset being built class by class (or picture by picture): not an error yet, the next step
        st.info(f"{e} Add a second class above: name it, then take its pictures or add its images.",
                icon=":material/add_photo_alternate:")
        st.stop()

    st.header(f"Report: {path.name}")
    m = st.columns(5)
    m[0].metric("Classes", rep["num_classes"])
    m[1].metric("Images", rep["num_images"])
    m[2].metric("Training", rep["split"]["train"], help=field_help("val_split"))
    m[3].metric("Validation", rep["split"]["val"], help="Held back from training to measure accuracy.")
    m[4].metric("Skipped files", len(rep["skipped"]))
    for w in rep["warnings"]:
        st.warning(w)
    if rep["imbalance_ratio"] < 3:
        st.caption(f"Class balance: the largest class has {rep['imbalance_ratio']:.1f}× the images of the smallest.")

    left, right = st.columns([3, 2])
    with left:
        st.subheader("Images per class")
        st.plotly_chart(charts.class_counts(rep["counts"], rep["split_counts"] or None), width="stretch")
    with right:
        st.subheader("Train / validation split")
        st.caption(f"Stratified and seeded (seed {seed}): {val_split:.0%} of each class is held out for "
                   "validation" + (", plus the folder's own test split." if rep["split"]["test"] else "."))
        table = pd.DataFrame(rep["split_by_class"])
        if not rep["split"]["test"]:
            table = table.drop(columns="test")
        table.index.name = "class"
        st.dataframe(table, width="stretch")

    if rep["skipped"]:
        with st.expander(f"Skipped files ({len(rep['skipped'])})", expanded=len(rep["skipped"]) <= 10):
            st.dataframe(pd.DataFrame(rep["skipped"]), width="stretch", hide_index=True)

    st.subheader("Thumbnails")
    for cls, paths in rep["thumbnails"].items():
        st.markdown(f"**{cls}** — {rep['counts'].get(cls, 0)} images")
        if paths:
            st.image(paths, width=84)

    data_check(ws, path, val_split, seed, list(rep["counts"]))
