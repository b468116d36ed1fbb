"""The kinds of task a worker runs: for each, its lane and the engine call it makes, from JSON parameters to a
JSON result (images and files the result names are written into the task's folder).

Parameters name everything a result depends on, so that they can key it (``tl_core.runs.tasks``): a dataset
by its path *and* its file signature (``tl_core.data.library.dataset_signature``), a run by its directory
*and* its files' stamp (``RunFiles.stamp``). The engine modules are imported inside each function, so the
app's server, which only submits and reads tasks, never imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import TrainConfig
from ..data.images import load_image
from ..errors import ConfigError, DatasetError, TLError
from ..insight.foreign import foreign_check
from ..models.openset import set_threshold
from ..storage.workspace import Workspace
from .launch import run_group, train_procs

__all__ = ["TaskKind", "KINDS", "kind_spec", "jsonable"]


@dataclass(frozen=True)
class TaskKind:
    """One kind of task: its name, lane, what it does (shown to users) and the function that runs it.
    ``forward_passes``: the task runs a network over many images, batch after batch, and fine-tunes nothing (or a
    function of the workspace and the task's parameters saying whether this one does), so a worker process runs it
    with the freed activations kept in the heap (tl_core.models.devices.heap_reused)."""

    name: str
    lane: str
    label: str
    run: Callable[[Workspace, dict[str, Any], Any], Any]
    forward_passes: bool | Callable[[Workspace, dict[str, Any]], bool] = False

    def runs_forward_passes(self, ws: Workspace, params: dict[str, Any]) -> bool:
        """Whether the task with ``params`` is one of forward passes (``forward_passes``)."""
        return self.forward_passes(ws, params) if callable(self.forward_passes) else self.forward_passes


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars and arrays, tuples and paths turned into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def _counting(ctx: Any, message: str) -> Callable[[int, int], None]:
    """A (done, total) progress callback that reports ``message`` with the time left."""
    t0 = time.monotonic()

    def progress(done: int, total: int) -> None:
        elapsed = time.monotonic() - t0
        eta = elapsed / done * (total - done) if done else None
        ctx.progress({"stage": "work", "message": message, "done": int(done), "total": int(total), "eta_s": eta})

    return progress


def _save_png(img: Any, out_dir: Path, name: str, side: int | None = None) -> str:
    if side:
        img = img.copy()
        img.thumbnail((side, side))
    img.save(out_dir / name, format="PNG")
    return name


# --------------------------------------------------------------------------------------------------
# compute lane
# --------------------------------------------------------------------------------------------------
def _train(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from .training import run_training

    run = ws.store().get(p["run_id"])
    try:
        cfg = TrainConfig.from_saved(run["config"])
    except (TypeError, ValueError) as e:
        ws.store().update(p["run_id"], status="failed", error=f"Unreadable configuration: {e}", pid=None)
        raise ConfigError(f"Unreadable configuration: {e}") from None
    procs = train_procs()
    if procs > 1:  # a torchrun group (TL_TRAIN_PROCS, or every GPU): the whole group is this task
        status = run_group(ws, p["run_id"], procs, should_cancel=ctx.should_cancel,
                           log_path=ctx.out_dir / "torchrun.log")
        row = ws.store().get(p["run_id"])
        return {"run_id": p["run_id"], "status": status, "error": row.get("error"), "world_size": procs}
    res = run_training(ws, run["data"], cfg, run_id=p["run_id"], raise_errors=False, should_cancel=ctx.should_cancel)
    return {"run_id": res.run_id, "status": res.status, "error": res.error, "seconds": res.seconds, "world_size": 1}


def _train_runs_forward_passes(ws: Workspace, p: dict[str, Any]) -> bool:
    """A training in this process (not a torchrun group's) whose saved config is a linear probe or auto's."""
    try:
        return train_procs() == 1 and TrainConfig.from_saved(ws.store().get(p["run_id"])["config"]).runs_forward_passes
    except (TLError, KeyError, TypeError, ValueError):  # an unreadable run: _train records why
        return False


def _audit(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..insight.audit import audit_dataset

    return audit_dataset(p["data"], p["backbone"], ws, val_split=p["val_split"], seed=p["seed"],
                         max_per_class=p.get("max_per_class"),
                         progress=_counting(ctx, "Computing features"), should_cancel=ctx.should_cancel)


def _advise(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..insight.advisor import advise

    def on(e: dict[str, Any]) -> None:
        ctx.progress({"stage": "work", "done": e["index"] * e["total"] + e["done"], "total": e["count"] * e["total"],
                      "message": f"{e['backbone']} ({e['index'] + 1} of {e['count']})"})

    return advise(p["data"], p["backbones"], ws, max_per_class=p["max_per_class"], val_split=p["val_split"],
                  seed=p["seed"], progress=on, should_cancel=ctx.should_cancel)


def _embedding_map(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..insight.embedding import embedding_map

    df = embedding_map(p.get("data"), p.get("backbone"), p["method"], run=p.get("run"), workspace=ws,
                       max_per_class=p.get("max_per_class"), seed=p.get("seed", 0),
                       progress=_counting(ctx, "Computing features"), should_cancel=ctx.should_cancel)
    return {"rows": df.to_dict("records"), "attrs": dict(df.attrs)}


def _domain_gap(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..insight.advisor import GAP_LEVELS, STYLE_LEVELS, domain_gap

    res = domain_gap(p["data"], p["backbone"], ws, max_per_class=p["max_per_class"], seed=p["seed"],
                     progress=_counting(ctx, "Measuring content and style"), should_cancel=ctx.should_cancel)
    # the page's charts draw the thresholds (the style levels' finite upper bounds)
    return {**res, "levels": GAP_LEVELS, "style_levels": [(hi, lv) for hi, lv, _ in STYLE_LEVELS if hi != float("inf")]}


def _gradcam(ws: Workspace, p: dict[str, Any], ctx: Any) -> list[dict[str, Any]]:
    from ..insight.explain import explain_misclassified

    ctx.progress({"stage": "work", "message": f"Grad-CAM of up to {p['k']} misclassified images", "done": 0,
                  "total": p["k"], "force": True})
    rows = explain_misclassified(p["run"], k=p["k"], target=p["target"], split=p.get("split", "val"))
    out = []
    for n, r in enumerate(rows):
        out.append({k: r[k] for k in ("path", "true", "predicted", "confidence", "target", "flat", "model",
                                      "model_label", "model_confidence")}
                   | {"overlay": _save_png(r["overlay"], ctx.out_dir, f"cam-{n}.png", side=320)})
    return out


def _calibrate(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..insight.calibrate import calibrate_run

    return calibrate_run(p["run"], ws, apply=bool(p.get("apply")))


def _lab(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..insight.lab import learning_curve

    return learning_curve(p["data"], p["backbone"], sizes=p["sizes"], epochs=p["epochs"], image_size=p["image_size"],
                          arms=p["arms"], val_split=p["val_split"], seed=p["seed"], workspace=ws,
                          progress=ctx.progress, should_cancel=ctx.should_cancel)


_MIME = {"zip": "application/zip", "onnx": "application/octet-stream", "pt": "application/octet-stream",
         "json": "application/json", "html": "text/html"}


def _export(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..share.formats import export_model, export_name  # an unknown format: export_name's ExportError

    ctx.progress({"stage": "work", "message": f"Exporting {p['format']} and verifying it", "force": True})
    run_name = Path(p["run"]).name
    # the web page: the folder "page" (Try it → Live shows it) and page.zip (to download)
    res = export_model(p["run"], p["format"], ctx.out_dir / export_name(run_name, p["format"]))
    files = [Path(f) for f in res.pop("written")]
    res["files"] = [{"name": f"tl-studio-{run_name}-webpage.zip" if p["format"] == "webpage" else f.name,
                     "file": f.name, "bytes": f.stat().st_size,
                     "mime": _MIME.get(f.suffix.lstrip("."), "application/octet-stream")} for f in files]
    if p["format"] == "webpage":
        res["page"] = "page"
    for k in ("path", "sidecar", "index", "zip"):
        res.pop(k, None)
    if res.get("int8"):
        res["int8"].pop("path", None)
    return res


def _report(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..share.report import write_report

    ctx.progress({"stage": "work", "message": "Writing the HTML report", "force": True})
    out = ctx.out_dir / f"tl-studio-report-{Path(p['run']).name}.html"
    write_report(p["run"], out)
    return {"files": [{"name": out.name, "file": out.name, "bytes": out.stat().st_size, "mime": "text/html"}]}


def _foreign_check(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return foreign_check(p["run"], p["images"], names=p.get("names"), workspace=ws,
                         progress=_counting(ctx, "Scoring the foreign images"))


def _time_backbone(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..models.backbones import time_backbone

    return {"backbone": p["backbone"], "ms_per_image": time_backbone(p["backbone"])}


def _class_export(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..classroom.overview import export_class

    ctx.progress({"stage": "work", "message": "Writing the class's results and reports", "force": True})
    out = ctx.out_dir / f"tl-studio-class-{time.strftime('%Y%m%d-%H%M')}.zip"
    res = export_class(ws, out, reports=bool(p.get("reports", True)),
                       progress=_counting(ctx, "Writing the runs' HTML reports"))
    return {"runs": res["runs"], "reports": res["reports"], "failed": res["failed"],
            "files": [{"name": out.name, "file": out.name, "bytes": res["bytes"], "mime": "application/zip"}]}


def _challenge_setup(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..classroom.challenge import setup_challenge

    zip_out = ctx.out_dir / "tl-studio-challenge-training-data.zip" if p.get("carve") else None
    res = setup_challenge(ws, p["data"], carve=p.get("carve"), seed=int(p.get("seed", 0)),
                          name=p.get("name") or "Class challenge", remainder_zip=zip_out,
                          progress=_counting(ctx, "Checking the images"))
    if p.get("uploaded"):  # the teacher's upload has served its purpose (kept after a failure: fix and retry)
        Path(p["data"]).unlink(missing_ok=True)
    res["files"] = ([{"name": zip_out.name, "file": zip_out.name, "bytes": zip_out.stat().st_size,
                      "mime": "application/zip"}] if zip_out is not None and zip_out.is_file() else [])
    return res


def _intake(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Unpack, hash and check an uploaded dataset zip (``tl_core.runs.datasets.receive_zip``), register it with its
    first version, and write its first report; the upload's files are removed whatever happens (a refused zip
    leaves nothing behind: the page shows the error, and the bytes are still in the browser's uploader)."""
    from ..data.library import save_uploaded_zip
    from ..data.report import dataset_overview

    files = [Path(p["upload"])] + ([Path(p["labels"])] if p.get("labels") else [])
    incoming = ws.incoming_dir.resolve()
    if any(f.resolve().parent != incoming for f in files):
        raise DatasetError("The upload is not in this workspace's incoming folder; upload it again.")
    t0 = time.monotonic()
    checking_since: list[float] = []

    def progress(what: str, done: int, total: int) -> None:
        event: dict[str, Any] = {"stage": "work"}
        if what.startswith("Unpacking"):  # bytes: said in MB, as a fraction
            event.update(message=f"{what}: {done / 1e6:.1f} of {total / 1e6:.1f} MB (step 1 of 4)",
                         fraction=done / total if total else 1.0)
        elif what.startswith("Checking"):  # images: counted, with the time left
            checking_since[:] = checking_since or [time.monotonic()]
            spent = time.monotonic() - checking_since[0]
            event.update(message=f"{what} (step 2 of 4)", done=int(done), total=int(total),
                         eta_s=spent / done * (total - done) if done else None)
        else:
            event.update(message=f"{what} (step 3 of 4)", force=True)
        ctx.progress(event)

    try:
        if not files[0].is_file():
            raise DatasetError(f"The upload of {p['name']} is gone (the server was restarted or it was cleaned "
                               "up); upload it again.")
        labels = files[1].read_bytes() if len(files) > 1 else None
        folder = save_uploaded_zip(ws, p["name"], files[0], labels_csv=labels, progress=progress,
                                   should_cancel=ctx.should_cancel)
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    ctx.progress({"stage": "work", "message": "Writing the dataset report (step 4 of 4)", "force": True})
    out: dict[str, Any] = {"dataset": folder.name, "path": str(folder), "classes": None, "images": None, "skipped": None}
    try:  # the report warms the check cache under the dataset's final paths: the page's own report only looks it up
        rep = dataset_overview(folder, ws, float(p.get("val_split", 0.2)), int(p.get("seed", 0)))
        out.update(classes=rep["num_classes"], images=rep["num_images"], skipped=len(rep["skipped"]))
    except DatasetError as e:  # the dataset is saved: the page's report says what is wrong with it
        out["report_error"] = str(e)
    return out | {"seconds": round(time.monotonic() - t0, 3)}


def _challenge_score(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..classroom.challenge import score_run

    ctx.progress({"stage": "work", "message": "Scoring the run on the locked test set", "force": True})
    return score_run(ws, p["run"], challenge_id=p.get("challenge"))


# --------------------------------------------------------------------------------------------------
# interactive lane (warm models)
# --------------------------------------------------------------------------------------------------
def _warm_model(ctx: Any, run: str, stamp: Any, head: str = "saved") -> Any:
    from ..share.loading import load_model

    return ctx.models.get((run, str(stamp), head), lambda: load_model(run, head=head, device="auto"))


def _predict(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..share.predict import predict_pil, predictions_csv

    tm = _warm_model(ctx, p["run"], p.get("stamp"))
    images, names, skipped = [], [], []
    for path, name in zip(p["images"], p["names"]):
        try:
            images.append(load_image(path))
            names.append(name)
        except DatasetError as e:
            skipped.append({"path": name, "reason": str(e).split(": ", 1)[-1]})
    rows = predict_pil(tm, images, top_k=int(p.get("top_k", 3))) if images else []
    # the image as the model read it (RGB, small): what a page shows, without decoding the upload itself
    rows = [{"path": n, **r, "image": _save_png(img, ctx.out_dir, f"input-{k}.png", side=320)}
            for k, (n, r, img) in enumerate(zip(names, rows, images))]
    csv = predictions_csv(rows)
    _nearest_thumbnails(rows[:NEAREST_THUMBNAIL_ROWS], ctx.out_dir)
    return {"rows": rows, "skipped": skipped, "classes": tm.classes, "csv": csv}


#: Prediction rows whose nearest training images get thumbnails (Try it draws the first 12 images).
NEAREST_THUMBNAIL_ROWS = 12


def _nearest_thumbnails(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Add ``thumb`` (a small PNG in the task's folder, or None when the file is gone) to each of the rows'
    ``nearest`` training images, so that a page shows them without decoding the training images itself."""
    made: dict[str, str | None] = {}
    for k, r in enumerate(rows):
        near = r.get("nearest") or []
        for j, nb in enumerate(near):
            path = str(nb.get("path") or "")
            if path not in made:
                try:
                    made[path] = _save_png(load_image(path), out_dir, f"nearest-{k}-{j}.png", side=160)
                except (DatasetError, OSError):  # the dataset was moved or deleted: the page says so
                    made[path] = None
            nb["thumb"] = made[path]


def _explain(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..insight.explain import explain_image

    tm = _warm_model(ctx, p["run"], p.get("stamp"))
    res = explain_image(tm, p["image"], target=p.get("target"))
    return {k: res[k] for k in ("label", "confidence", "top_k", "target", "flat", "layer", "model")} | {
        "overlay": _save_png(res["overlay"], ctx.out_dir, "overlay.png", side=480)}


def _augment_preview(ws: Workspace, p: dict[str, Any], ctx: Any) -> list[dict[str, Any]]:
    from PIL import Image

    from ..models.preprocess import augmentation_preview

    out = []
    for n, (name, views) in enumerate(augmentation_preview(p["paths"], p["backbone"], p["preset"],
                                                           copies=int(p.get("copies", 4)), seed=int(p["seed"]))):
        files = [_save_png(Image.fromarray(v), ctx.out_dir, f"aug-{n}-{i}.png") for i, v in enumerate(views)]
        out.append({"name": name, "views": files})
    return out


def _set_ood_threshold(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return set_threshold(p["run"], float(p["threshold"]))


def _check_weights(ws: Workspace, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    from ..models.backbones import check_uploaded_weights

    return check_uploaded_weights(Path(p["path"]), p["backbone"])


KINDS: dict[str, TaskKind] = {k.name: k for k in [
    TaskKind("train", "compute", "Training", _train, forward_passes=_train_runs_forward_passes),
    TaskKind("audit", "compute", "Checking the data", _audit, forward_passes=True),
    TaskKind("advise", "compute", "Comparing backbones", _advise, forward_passes=True),
    TaskKind("embedding_map", "compute", "Drawing the embedding map", _embedding_map, forward_passes=True),
    TaskKind("domain_gap", "compute", "Measuring the domain gap", _domain_gap, forward_passes=True),
    TaskKind("gradcam", "compute", "Computing Grad-CAM heat-maps", _gradcam),
    TaskKind("calibrate", "compute", "Fitting temperature scaling", _calibrate),
    TaskKind("lab", "compute", "Running the lab", _lab),
    TaskKind("export", "compute", "Exporting and verifying", _export, forward_passes=True),
    TaskKind("report", "compute", "Writing the report", _report),
    TaskKind("time_backbone", "compute", "Timing the backbone", _time_backbone),
    TaskKind("foreign_check", "compute", "Scoring foreign images", _foreign_check, forward_passes=True),
    TaskKind("class_export", "compute", "Exporting the class's results", _class_export),
    TaskKind("challenge_setup", "compute", "Setting up the class challenge", _challenge_setup),
    TaskKind("challenge_score", "compute", "Scoring on the challenge's locked test set", _challenge_score,
             forward_passes=True),
    TaskKind("intake", "intake", "Unpacking and checking an upload", _intake),  # its own lane: never behind a training
    TaskKind("predict", "interactive", "Predicting", _predict),
    TaskKind("explain", "interactive", "Drawing where the model looked", _explain),
    TaskKind("augment_preview", "interactive", "Drawing augmented images", _augment_preview),
    TaskKind("check_weights", "interactive", "Checking the weights file", _check_weights),
    TaskKind("set_ood_threshold", "interactive", "Saving the open-set threshold", _set_ood_threshold),
]}


def kind_spec(name: str) -> TaskKind:
    """The :class:`TaskKind` called ``name``. Raises ConfigError for an unknown kind."""
    try:
        return KINDS[name]
    except KeyError:
        raise ConfigError(f"Unknown task kind {name!r}; known: {', '.join(KINDS)}.") from None
