"""The ``tl-core`` command: the engine from a shell, with ``--json`` for scripts.

Exit status: 0 success; 2 the user's input is wrong (one ``error:`` line on stderr saying what and how
to fix it); 1 anything else. With ``--json`` exactly one JSON document goes to stdout, also when the command
fails (``{"error": ..., "exit_status": ...}``); logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .config import TrainConfig, config_fields, field_help
from .errors import CancelledError, ConfigError, TLError

__all__ = ["main", "build_parser"]

log = logging.getLogger("tl_core")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors follow our exit-2 contract
        raise _UsageError(f"{message} (see `{self.prog} --help`)")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        # an unknown option is reported by the (sub-)command that got it, whose --help lists its options (argparse
        # would leave it to the top-level parser, whose --help does not), with the nearest option it has
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            import difflib

            near = [difflib.get_close_matches(a.split("=", 1)[0], list(self._option_string_actions), n=1)
                    for a in extras if a.startswith("--")]
            hint = next((f"; did you mean {m[0]}?" for m in near if m), "")
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return ns, extras


def _workspace():
    from .storage.workspace import Workspace

    return Workspace.default()


_printed = {"json": False}  # whether this command already wrote its one JSON document (main's error path)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()
    _printed["json"] = True


def emit(args: argparse.Namespace, result: Any, text: Iterable[str] | Callable[[], Iterable[str]] = ()) -> int:
    """Print a command's result, the one way every command does: with ``--json`` exactly one JSON document (the
    result), else its text lines.

    Args:
        args: the command's parsed arguments (``args.json``).
        result: what ``--json`` prints (JSON-able; anything else is written as its ``str``).
        text: the lines a person reads: a generator, or a callable returning the lines (``lambda: [...]``), so
            that they are built only without ``--json`` (a formatting slip can then never fail a ``--json`` run).
    Returns:
        0: the command's exit status.
    """
    if args.json:
        _print_json(result)
    else:
        for line in text() if callable(text) else text:
            print(line)
    return 0


def _stderr_progress(quiet: bool):
    state = {"last": 0.0, "stage": None}

    def show(e: dict[str, Any]) -> None:
        if quiet:
            return
        stage = e.get("stage")
        now = time.monotonic()
        if stage == "epoch":
            va = e.get("val_acc")
            train = f"train loss {e['train_loss']:.4f}" if "train_loss" in e else "linear probe (start)"
            step = f"epoch {e['epoch']}/{e['epochs']}" if e.get("epochs") else f"solver round {e['epoch']}"
            sys.stderr.write(f"{step}: {train} "
                             f"val loss {e['val_loss']:.4f} val acc {va:.3f}\n")
        elif stage != state["stage"] or now - state["last"] > 2 or e.get("done") == e.get("total"):
            if "done" in e and "total" in e:
                sys.stderr.write(f"{stage}: {e['done']}/{e['total']}\n")
            elif e.get("message"):
                sys.stderr.write(f"{e['message']}\n")
            state["last"] = now
        state["stage"] = stage
        sys.stderr.flush()

    return show


def _resolve_run_dir(ref: str) -> Path:
    """A run id (in $TL_HOME) or a run directory."""
    from .storage.files import resolve_run

    return resolve_run(ref, _workspace())


# -- commands --------------------------------------------------------------------------------------
def cmd_backbones(args: argparse.Namespace) -> int:
    from .models.catalogue import catalogue

    rows = catalogue()

    def text() -> Iterator[str]:
        yield f"{'name':24} {'params':>7} {'size':>5} {'top1':>6} {'ms/img':>7}  {'licence':11} weights"
        for r in rows:
            avail = "offline" if r["available_offline"] else "needs internet"
            ms = f"{r['cpu_ms']:7.1f}" if r["cpu_ms"] else f"{'?':>7}"
            yield (f"{r['name']:24} {r['params_m']:6.1f}M {r['input_size']:5d} {r['imagenet_top1']:6.2f} {ms}  "
                   f"{r['license'] or '?':11} {r['weights']} ({avail})")

    return emit(args, rows, text())


def cmd_check(args: argparse.Namespace) -> int:
    from .data.library import open_data
    from .data.report import dataset_report
    from .data.splits import split_dataset

    ds = open_data(args.data, _workspace())
    rep = dataset_report(ds, split_dataset(ds, args.val_split, args.seed))

    def text() -> Iterator[str]:
        yield f"{rep['num_images']} images in {rep['num_classes']} classes ({rep['source']})"
        for c, n in rep["counts"].items():
            yield f"  {c:24} {n}"
        yield f"split: {rep['split']}"
        yield f"image sizes: {rep['image_size']}; imbalance {rep['imbalance_ratio']}x"
        for s in rep["skipped"]:
            yield f"  skipped {s['path']}: {s['reason']}"
        for w in rep["warnings"]:
            yield f"warning: {w}"

    return emit(args, rep, text())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of ``tl-core train``: ``--config FILE`` (a run's ``config.json``) or the defaults,
    then every flag given on the command line on top."""
    from .storage.files import read_config_file

    base = read_config_file(args.config) if args.config else {}
    given = {f.name: getattr(args, f.name) for f in config_fields() if getattr(args, f.name, None) is not None}
    try:
        return TrainConfig.from_saved(base, given).resolved()
    except TypeError as e:
        raise ConfigError(f"The config has a value of the wrong type ({e}).") from None


def _note_unused_flags(args: argparse.Namespace, strategy: str) -> None:
    """A note on stderr for each flag given that the run's strategy does not use (``--epochs`` with auto, which
    gives each try its strategy's own; ``--time-budget`` with linear), rather than ignoring it silently."""
    from .runs.auto import SETTINGS_AUTO_CHOOSES, settings_used

    used = settings_used(strategy)
    unused = [f.name for f in config_fields() if getattr(args, f.name, None) is not None and f.name not in used]
    if not unused:
        return
    from .config import STRATEGIES, field_spec

    flags = " and ".join(", ".join(f"--{n.replace('_', '-')}" for n in unused).rsplit(", ", 1))
    if strategy == "auto" and set(unused) <= set(SETTINGS_AUTO_CHOOSES):
        why = ("auto gives each try its strategy's own epochs, learning rate and patience; to set them, choose "
               "--strategy partial or full")
    else:
        users = {s for n in unused for s in field_spec(n).strategies}
        why = "used by " + ", ".join(s for s in STRATEGIES if s in users)
    sys.stderr.write(f"note: {flags} {'has' if len(unused) == 1 else 'have'} no effect with the {strategy} "
                     f"strategy ({why}).\n")


def cmd_train(args: argparse.Namespace) -> int:
    from .models.distributed import under_torchrun
    from .runs.training import result_of, run_training

    cfg = config_from_args(args)
    if not under_torchrun():  # once, not once per process of a group
        _note_unused_flags(args, cfg.strategy)
    # a short process of forward passes (fine-tuning keeps glibc's defaults; a fine-tune auto's budget affords
    # also runs in this short process)
    if cfg.runs_forward_passes:
        from .models.devices import reuse_heap_memory

        reuse_heap_memory()
    ws = _workspace()
    if args.nproc > 1 and not under_torchrun():
        from .data.library import open_data
        from .runs.launch import train_with_group

        # the group's run is recorded before its processes start: a typo in the data is found here first, so
        # that it leaves no failed run behind (the check fills the cache the group's first rank then reads)
        show = _stderr_progress(args.quiet)
        open_data(args.data, ws, progress=lambda d, t: show({"stage": "check", "done": d, "total": t}))
        if args.test is not None:
            open_data(args.test, ws, min_per_class=1)
        run_id = train_with_group(ws, args.data, cfg, args.nproc, args.test, progress=_stderr_progress(args.quiet))
        res = result_of(ws, run_id)
        if res.status != "done":
            sys.stderr.write(f"error: run {run_id} {res.status}: {res.error}\n")
            emit(args, res.to_dict())
            return 1
    else:
        res = run_training(ws, args.data, cfg, progress=_stderr_progress(args.quiet), test_data=args.test)
        if res.run_id is None:
            return 0  # a rank other than 0 under torchrun: rank 0 reports

    def text() -> Iterator[str]:
        from .share.progress import model_text, stop_text

        from .metrics import format_figure

        yield (f"run {res.run_id}: {res.status} in {res.seconds:.1f}s on {res.device}"
               + (f" x {res.world_size} processes" if res.world_size > 1 else ""))
        if res.auto:  # the model the run holds, and why auto kept it
            yield f"{model_text({'config': {'strategy': 'auto'}, 'summary': {'auto': res.auto}})}: {res.auto['reason']}"
        yield "validation accuracy " + format_figure(res.val_accuracy, res.val_accuracy_ci,
                                                     _correct(res.val_accuracy, res.val_count), res.val_count or None)
        if res.cv_accuracy is not None:
            yield (f"cross-validated on {res.cv_count} images ({res.cv_folds} folds): "
                   + format_figure(res.cv_accuracy, res.cv_accuracy_ci, _correct(res.cv_accuracy, res.cv_count),
                                   res.cv_count))
        if res.test_accuracy is not None:
            yield "test accuracy " + format_figure(res.test_accuracy, res.test_accuracy_ci,
                                                   _correct(res.test_accuracy, res.test_count), res.test_count or None)
        if res.multi_label:  # val accuracy is then the exact-match accuracy
            yield (f"multi-label validation: micro-F1 {format_figure(res.micro_f1, res.micro_f1_ci, percent=False)}, "
                   f"macro-F1 {res.macro_f1:.3f}, mAP {format_figure(res.mAP, res.mAP_ci, percent=False)}, "
                   f"exact match {res.exact_match:.3f}; thresholds chosen on the {res.thresholds_chosen_on}")
        how = stop_text(cfg.strategy, res.stop or {}, res.best_epoch)
        if how:
            yield how
        yield f"run directory: {res.run_dir}"

    return emit(args, res.to_dict(), text())


def _correct(share: float | None, n: int) -> int | None:
    """The count behind a proportion of n images (its figures are k / n, rounded to 6 decimals)."""
    return int(round(share * n)) if share is not None and n else None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .models.devices import reuse_heap_memory
    from .share.loading import load_model
    from .share.predict import evaluate_dataset

    reuse_heap_memory()
    model = load_model(_resolve_run_dir(args.run), device=args.device)
    rep = evaluate_dataset(model, args.data, workspace=_workspace())
    _note_open_set(model)

    def text() -> Iterator[str]:
        from .metrics import format_figure

        if rep.get("multi_label"):
            yield (f"micro-F1 {format_figure(rep['micro_f1'], rep.get('micro_f1_ci'), percent=False)}, "
                   f"macro-F1 {rep['macro_f1']:.4f}, mAP {format_figure(rep['mAP'], rep.get('mAP_ci'), percent=False)}, "
                   f"exact match {format_figure(rep['exact_match'], rep.get('exact_match_ci'), rep.get('correct'), rep['count'])}"
                   f" ({rep['evaluated']})")
            yield f"{'label':24} {'prec':>6} {'recall':>6} {'f1':>6} {'n':>5} {'thresh':>6}"
            for c, r in rep["per_label"].items():
                yield f"{c:24} {r['precision']:6.3f} {r['recall']:6.3f} {r['f1']:6.3f} {r['support']:5d} {r['threshold']:6.3f}"
            return
        yield (f"accuracy {format_figure(rep['accuracy'], rep.get('accuracy_ci'), rep.get('correct'), rep['count'])} "
               f"({rep['evaluated']})")
        if rep.get("unknown_share") is not None:
            yield f"unlike the training images (unknown): {rep['unknown_share']:.1%}"
        yield f"{'class':24} {'prec':>6} {'recall':>6} {'f1':>6} {'n':>5}"
        for c, r in rep["per_class"].items():
            yield f"{c:24} {r['precision']:6.3f} {r['recall']:6.3f} {r['f1']:6.3f} {r['support']:5d}"

    return emit(args, rep, text())


def _note_open_set(model: Any) -> None:
    """A model from before open-set scores answers without ``unknown``: say so on stderr."""
    if model.open_set is None:
        from .models.openset import UNKNOWN_NOTE

        sys.stderr.write(f"note: {UNKNOWN_NOTE}\n")


def cmd_predict(args: argparse.Namespace) -> int:
    from .models.devices import reuse_heap_memory
    from .share.loading import load_model
    from .share.predict import predict_paths

    reuse_heap_memory()
    ref = Path(args.model)
    # a file is a bundle, whatever its name
    model = load_model(ref if ref.is_file() else _resolve_run_dir(args.model), device=args.device)
    rows, skipped = predict_paths(model, args.paths, top_k=args.top_k, workspace=_workspace())
    _note_open_set(model)
    if args.csv:
        from .share.predict import write_predictions_csv

        write_predictions_csv(rows, args.csv)
    for s in skipped:
        sys.stderr.write(f"skipped {s['path']}: {s['reason']}\n")
    emit(args, rows, (f"{r['path']}\t{r['label']}\t{r['confidence']:.3f}"
                      + (f"\tunknown ({r['ood_reason']})" if r.get("unknown") and r.get("ood_reason") else
                         "\tunknown" if r.get("unknown") else "") for r in rows))
    if not rows and skipped:
        from .errors import DatasetError

        raise DatasetError("None of the given files could be read as images.")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """``tl-core serve``: the model behind an HTTP API until Ctrl-C (tl_core/share/serve.py, docs/serve.md)."""
    from .models.devices import configure_threads, reuse_heap_memory
    from .share.loading import load_model
    from .share.serve import ServeLimits, require_serve_extra, run_server

    require_serve_extra()  # before the model loads: the missing extra is the first thing to say
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port; give 0-65535 (0 takes a free one).")
    if args.max_batch < 1 or args.max_queue < 1:
        raise ConfigError("--max-batch and --max-queue must be at least 1.")
    # one long-lived process running one forward pass shape: keeping freed activations is cheaper than mapping
    # them again every batch, and its peak is one batch (--max-batch); every core goes to that forward pass
    reuse_heap_memory()
    configure_threads()
    ref = Path(args.model)
    model = load_model(ref if ref.is_file() else _resolve_run_dir(args.model), device=args.device)
    _note_open_set(model)
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.stderr.write(f"note: listening on {args.host} without --api-key: anyone who can reach this machine "
                         "can use the model.\n")
    try:
        run_server(model, host=args.host, port=args.port, api_key=args.api_key or None, top_k=args.top_k,
                   limits=ServeLimits(max_batch=args.max_batch, max_queue=args.max_queue))
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has shut down: the way a server is stopped
        pass
    sys.stderr.write("stopped\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .models.devices import reuse_heap_memory
    from .share.formats import export_model, export_summary

    # a short process of forward passes (the verification's, 64 images at once, on PyTorch and the exported file):
    # keeping their freed activations instead of mapping them again took a TorchScript export of a Lite0 linear run
    # from 8.3 s to 5.5 s (system time 5.5 s -> 1.2 s), as it does for train, evaluate and predict
    reuse_heap_memory()
    out = export_model(_resolve_run_dir(args.run), args.format, args.out)
    return emit(args, out, lambda: export_summary(out))


def cmd_report(args: argparse.Namespace) -> int:
    from .share.report import write_report

    out = write_report(_resolve_run_dir(args.run), args.out)
    return emit(args, out, lambda: [f"wrote {out['path']}"])


def cmd_runs(args: argparse.Namespace) -> int:
    """``tl-core runs``: every run of the workspace, newest first, naming the model it holds (an auto run's kept
    try: ``backbone`` and ``strategy`` in the JSON, beside the ``config`` it was started with)."""
    from .share.progress import kept_model

    ws = _workspace()
    store = ws.store()
    store.mark_dead_workers()
    runs = store.list()

    def text() -> Iterator[str]:
        for r in runs:
            s = r.get("summary") or {}
            acc = s.get("val_accuracy")
            backbone, strategy = kept_model(r)
            if r["config"].get("strategy") == "auto" and strategy != "auto":
                strategy = f"auto → {strategy}"
            yield (f"{r['id']}  {r['status']:11} {backbone or '':20} {strategy or '':16} "
                   f"{'' if acc is None else f'val acc {acc:.3f}'}  {r.get('error') or ''}")

    keys = ("id", "status", "created", "updated", "data", "config", "summary", "error")
    return emit(args, [{**{k: r.get(k) for k in keys}, **dict(zip(("backbone", "strategy"), kept_model(r)))}
                       for r in runs], text())


def cmd_settings(args: argparse.Namespace) -> int:
    """``tl-core settings``: every ``TL_*`` environment setting, its type, default, help and current value."""
    from .settings import describe

    rows = describe()

    def text() -> Iterator[str]:
        for r in rows:
            value = "(unset)" if r["value"] is None else r["value"]
            yield f"{r['name']:24} {value:12} default {r['default']}; {r['type']}"
            yield f"{'':24} {r['help']}"
            if r["error"]:
                yield f"{'':24} error: {r['error']}"

    return emit(args, rows, text())


# -- insight commands (advisor, audit, lab, Grad-CAM, calibration; tl_core/advisor.py etc.) ----------
def _sizes_arg(text: str) -> list[int | None]:
    out: list[int | None] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) >= 1:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"--sizes takes images per class like 5,10,20,all (got {part!r})")
    return out


def _image_size_arg(text: str) -> int | None:
    if text.strip().lower() in ("native", "none", "0"):
        return None
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"--image-size takes pixels or 'native' (got {text!r})")
    return int(text)


def _progress_line(quiet: bool):
    last = [0.0]

    def show(e: Any, total: int | None = None) -> None:
        if quiet:
            return
        now = time.monotonic()
        if now - last[0] < 1.0:
            return
        last[0] = now
        if isinstance(e, dict):
            what = " ".join(str(e[k]) for k in ("stage", "backbone", "arm", "images_per_class") if e.get(k) is not None)
            sys.stderr.write(f"{what}: {e.get('done', '')}/{e.get('total', '')}\n")
        else:
            sys.stderr.write(f"features: {e}/{total}\n")
        sys.stderr.flush()

    return show


def cmd_advise(args: argparse.Namespace) -> int:
    from .insight.advisor import advise

    names = [b.strip() for b in args.backbones.split(",") if b.strip()] if args.backbones else None
    res = advise(args.data, names, _workspace(), max_per_class=args.max_per_class or None, val_split=args.val_split,
                 seed=args.seed, progress=_progress_line(args.quiet))

    def text() -> Iterator[str]:
        yield f"{'rank':>4} {'backbone':22} {'LogME':>8} {'LEEP':>8} {'probe':>6} {'k-NN':>6} {'seconds':>8}"
        for r in res["ranking"]:
            leep = "" if r["leep"] is None else f"{r['leep']:8.3f}"
            yield (f"{r['rank']:>4} {r['backbone']:22} {r['logme']:8.3f} {leep:>8} {r['probe_accuracy']:6.3f} "
                   f"{r['knn_accuracy']:6.3f} {r['seconds']:8.1f}")
        for f in res["failed"]:
            yield f"skipped {f['backbone']}: {f['error']}"
        yield f"recommended: {res['recommended']} (confidence {res['confidence']}). {res['reason']}"

    return emit(args, res, text())


def cmd_audit(args: argparse.Namespace) -> int:
    from .insight.audit import audit_dataset

    res = audit_dataset(args.data, args.backbone, _workspace(), val_split=args.val_split, seed=args.seed,
                        near_threshold=args.near_threshold, progress=_progress_line(args.quiet))

    def text() -> Iterator[str]:
        yield f"{res['images']} images in {len(res['classes'])} classes; split {res['split']}"
        for line in res["findings"]:
            yield f"- {line}"
        for r in res["leakage"][:20]:
            yield f"  leak ({r['kind']}, {r['similarity']:.3f}): {r['held_out']} ({r['split']}) = {r['train']} (train)"
        if res.get("label_check"):
            yield (f"label check: {'reliable' if res['label_check_reliable'] else 'NOT reliable'}. "
                   f"{res['label_check']['reason']}")
        for r in res["label_issues"][:20]:
            yield (f"  label? {r['path']}: labelled {r['label']}, looks like {r['suggested']} ({r['confidence']:.2f}, "
                   f"its own label {r['label_probability']:.2f})")
        if res["suggested_config"]:
            yield f"suggested training setting: {res['suggested_config']}"

    return emit(args, res, text())


def cmd_lab(args: argparse.Namespace) -> int:
    from .insight.lab import learning_curve

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    res = learning_curve(args.data, args.backbone, sizes=args.sizes, epochs=args.epochs, image_size=args.image_size,
                         arms=arms, val_split=args.val_split, seed=args.seed, workspace=_workspace(),
                         progress=_progress_line(args.quiet))
    return emit(args, res, lambda: [f"{'arm':10} {'per class':>9} {'val acc':>8} {'seconds':>8}",
                            *(f"{r['arm']:10} {r['images_per_class']:>9} {r['val_accuracy']:8.3f} {r['seconds']:8.1f}"
                              for r in res["rows"]),
                            res["reading"]])


def cmd_explain(args: argparse.Namespace) -> int:
    from .insight.explain import explain_image

    ref = Path(args.run)
    run = ref if ref.suffix == ".zip" and ref.is_file() else _resolve_run_dir(args.run)
    res = explain_image(run, args.image, target=args.target, out=args.out, device=args.device)
    heat = res.pop("heatmap")
    res.pop("overlay")
    res["heat_mean"] = round(float(heat.mean()), 4)
    return emit(args, res, lambda: [f"{args.image}: {res['label']} ({res['confidence']:.3f}); Grad-CAM of {res['target']!r} "
                            f"at {res['layer']} written to {res['out']}"])


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .insight.calibrate import calibrate_run

    res = calibrate_run(_resolve_run_dir(args.run), _workspace(), apply=not args.dry_run)

    def ci(key: str) -> str:
        return " (95% CI {:.4f}-{:.4f})".format(*res[key]) if res.get(key) else ""

    return emit(args, res, lambda: [f"temperature {res['temperature']:.3f} fitted on {res['count']} validation images: ECE "
                            f"{res['ece_before']:.4f}{ci('ece_before_ci')} -> {res['ece_after']:.4f} on the same "
                            f"images, {res['ece_after_oof']:.4f}{ci('ece_after_oof_ci')} out of fold; NLL "
                            f"{res['nll_before']:.4f} -> {res['nll_after']:.4f}"
                            + ("" if res["applied"] else " (not saved: --dry-run)"),
                            *([f"warning: {res['warning']}"] if res["warning"] else []),
                            *(["note: out of fold, the scaling does not clearly lower the ECE (within its interval)"]
                              if res["helps_out_of_fold"] is False and res["temperature"] != 1.0 else [])])


def cmd_openset(args: argparse.Namespace) -> int:
    from .errors import RunError
    from .models.openset import UNKNOWN_NOTE, describe, flagged_share, set_threshold, summary
    from .storage.files import RunFiles

    run_dir = _resolve_run_dir(args.run)
    if args.threshold is not None:
        set_threshold(run_dir, args.threshold)
    record = RunFiles(run_dir).open_set_record()
    if record is None:
        raise RunError(UNKNOWN_NOTE)
    scores = record.get("calibration_scores") or []
    out = summary(record)
    out.update(saved=args.threshold is not None, flagged_share=flagged_share(scores, float(record["threshold"])),
               meaning=describe(record).replace("`", "").replace("**", ""))

    def text() -> Iterator[str]:
        unit = ("cosine distance to the nearest training image" if int(record.get("version", 1)) < 2 else
                "ood_score: the larger of the content and style distances, each as a multiple of its calibrated "
                "threshold")
        yield (f"threshold {float(record['threshold']):.3f} ({unit}; "
               f"{'chosen by hand' if record.get('chosen') else 'conformal, automatic'}"
               f"{', saved now' if args.threshold is not None else ''}): {out['flagged_share']:.0%} of the "
               f"{len(scores)} calibration images are above it")
        yield out["meaning"]

    return emit(args, out, text())


# --------------------------------------------------------------------------------------------------
# tl-core data: managed datasets and their versions
# --------------------------------------------------------------------------------------------------
def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _counts_text(c: dict[str, Any] | None) -> str:
    if not c:
        return "not versioned yet"
    return (f"{c['images']} images in {len(c['classes'])} classes"
            + (f", {c['excluded']} excluded" if c.get("excluded") else ""))


def _version_out(args: argparse.Namespace, name: str, entry: dict[str, Any]) -> int:
    note = " (nothing changed)" if entry.get("unchanged") else ""
    return emit(args, {"name": name, **entry},
                lambda: [f"{name}@{entry['version']}: {entry['change']}{note}; {_counts_text(entry['counts'])}"])


def cmd_data_import(args: argparse.Namespace) -> int:
    from .data.versions import import_dataset

    res = import_dataset(_workspace(), args.path, args.name)
    return emit(args, res, lambda: [f"imported {args.path} as {res['name']}@{res['version']}: {_counts_text(res['counts'])}",
                            *(f"  left out {s['path']}: {s['reason']}" for s in res["skipped"])])


def cmd_data_list(args: argparse.Namespace) -> int:
    from .data.versions import managed_datasets

    rows = managed_datasets(_workspace())
    return emit(args, rows, lambda: [f"{r['name']:24} {r['version'] or '-':10}  {_when(r['when'])}  {_counts_text(r['counts'])}"
                             for r in rows] or ["no datasets in the workspace (`tl-core data import PATH` adds one)"])


def cmd_data_versions(args: argparse.Namespace) -> int:
    from .data.versions import history

    rows = history(_workspace(), args.name)
    return emit(args, rows, (f"{r['version']}  {_when(r['when'])}  {_counts_text(r['counts']):40}  {r['change']}"
                             for r in rows))


def cmd_data_exclude(args: argparse.Namespace) -> int:
    from .data.versions import exclude_images

    return _version_out(args, args.name, exclude_images(_workspace(), args.name, args.files))


def cmd_data_relabel(args: argparse.Namespace) -> int:
    from .data.versions import relabel_images

    return _version_out(args, args.name, relabel_images(_workspace(), args.name, args.files, args.to))


def cmd_data_restore(args: argparse.Namespace) -> int:
    from .data.versions import restore_version

    return _version_out(args, args.name, restore_version(_workspace(), args.name, args.version))


def cmd_data_delete(args: argparse.Namespace) -> int:
    from .runs.datasets import delete_dataset

    kept = delete_dataset(_workspace(), args.name)
    return emit(args, {"name": args.name, "deleted": True, "runs_kept": kept},
                lambda: [f"deleted {args.name}" + (f"; {kept} run(s) trained on it are kept" if kept else "")])


def _add_data_commands(sub: Any) -> None:
    s = sub.add_parser("data", help="managed datasets of the workspace: import, versions, exclude, relabel, restore")
    verbs = s.add_subparsers(dest="data_command", required=True, parser_class=_Parser)

    v = verbs.add_parser("import", help="copy a folder, zip or CSV into the workspace as a managed dataset")
    v.add_argument("path", help="folder with one sub-folder per class, a .zip of one, or a CSV of path,label")
    v.add_argument("--name", default=None, help="the dataset's name (default: the folder's or file's name)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_data_import)

    v = verbs.add_parser("list", help="the datasets of the workspace and their current versions")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_data_list)

    v = verbs.add_parser("versions", help="a dataset's versions, newest first")
    v.add_argument("name")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_data_versions)

    v = verbs.add_parser("exclude", help="leave images out (a new version)")
    v.add_argument("name")
    v.add_argument("files", nargs="+", metavar="FILE", help="an image's path inside the dataset, e.g. cats/img_001.png")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_data_exclude)

    v = verbs.add_parser("relabel", help="move images to another class (a new version)")
    v.add_argument("name")
    v.add_argument("files", nargs="+", metavar="FILE", help="an image's path inside the dataset, e.g. cats/img_001.png")
    v.add_argument("--to", required=True, metavar="CLASS", help="the class to move them to (existing or new)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_data_relabel)

    v = verbs.add_parser("restore", help="make a new version equal to an earlier one")
    v.add_argument("name")
    v.add_argument("version", help="a version id (or its first four characters or more)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_data_restore)

    v = verbs.add_parser("delete", help="delete a dataset of the workspace (refused while a run uses it)")
    v.add_argument("name")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_data_delete)


def _flag_type(spec: Any, default: Any) -> Any:
    if spec.widget == "toggle" or isinstance(default, bool):
        return None
    if spec.choices or spec.name in ("backbone", "weights"):
        return str
    if isinstance(default, float) or spec.name == "lr":  # lr's default is None (the strategy's)
        return float
    return int


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (``--batch-size`` for ``batch_size``), with its help and choices.
    Every default is None: a flag not given leaves the value of ``--config`` or the config's own default."""
    import dataclasses

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for spec in config_fields():
        flag = "--" + spec.name.replace("_", "-")
        default = defaults[spec.name]
        shown = "the strategy's default" if default is None and spec.per_strategy else repr(default)
        help_text = f"{spec.help} (default: {shown})".replace("%", "%%")
        if spec.widget == "toggle" or isinstance(default, bool):
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=spec.name, type=_flag_type(spec, default), default=None,
                                choices=list(spec.choices) if spec.choices and spec.strict else None, help=help_text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``tl-core`` (the sub-commands of the contract in DESIGN.md and the README)."""
    from .share.formats import FORMAT_EXTENSIONS  # the export formats' one table (a light module)

    d = TrainConfig()  # the insight commands share the training defaults (one table drives every surface)
    p = _Parser(prog="tl-core", description="TL Studio engine: transfer learning on images from the command line. "
                "Workspace: $TL_HOME (default ~/.tl_studio).")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    s = sub.add_parser("backbones", help="list the backbone catalogue and where weights come from")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_backbones)

    s = sub.add_parser("check", help="validate a dataset and print its report")
    s.add_argument("data", help="folder with one sub-folder per class, a .zip of one, or a CSV of path,label")
    s.add_argument("--val-split", type=float, default=d.val_split, help=field_help("val_split"))
    s.add_argument("--seed", type=int, default=d.seed, help=field_help("seed"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_check)

    s = sub.add_parser("train", help="train a classifier and record the run")
    s.add_argument("data")
    s.add_argument("--config", default=None, metavar="CONFIG_JSON",
                   help="start from a saved configuration (a run's config.json, or its run directory); flags given "
                        "here override it. `tl-core train DATA --config RUN/config.json` repeats a run")
    add_config_flags(s)
    s.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes on this machine (PyTorch DDP launched with torchrun: gloo on the "
                        "CPU, nccl on GPUs); the same as `torchrun --nproc-per-node N -m tl_core.cli train ...`")
    s.add_argument("--test", default=None, help="held-out folder evaluated at the end")
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("evaluate", help="evaluate a run on labelled images (a dataset's test split if it has one)")
    s.add_argument("run", help="run id or run directory")
    s.add_argument("--data", required=True)
    s.add_argument("--json", action="store_true")
    s.add_argument("--device", default="auto", help="where the model runs: auto (CUDA, then Apple MPS, then the "
                   "CPU), cpu, cuda, cuda:N or mps")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("predict", help="label images with a run or an exported bundle")
    s.add_argument("model", metavar="RUN_OR_BUNDLE")
    s.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or zips")
    s.add_argument("--top-k", type=int, default=3)
    s.add_argument("--csv", default=None, help="also write the predictions to this CSV file")
    s.add_argument("--json", action="store_true")
    s.add_argument("--device", default="auto", help="where the model runs: auto (CUDA, then Apple MPS, then the "
                   "CPU), cpu, cuda, cuda:N or mps")
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("serve", help="serve a run or bundle as an HTTP API (POST /predict; docs/serve.md)")
    s.add_argument("model", metavar="RUN_OR_BUNDLE")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed at start)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this key in the X-API-Key header (or Authorization: Bearer KEY) for /predict "
                        "and /model; /health stays open")
    s.add_argument("--top-k", type=int, default=3)
    s.add_argument("--max-batch", type=int, default=32, help="images in one forward pass")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for the model; more get 503")
    s.add_argument("--device", default="auto", help="where the model runs: auto (CUDA, then Apple MPS, then the "
                   "CPU), cpu, cuda, cuda:N or mps")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("export", help="export a run as a bundle, ONNX, TorchScript, TFLite or a web page")
    s.add_argument("run")
    s.add_argument("--format", choices=list(FORMAT_EXTENSIONS), default="bundle",
                   help="webpage: a folder (--out DIR) with index.html that classifies offline in a browser; "
                        "tflite: float32 and int8 .tflite files (needs pip install -e '.[edge]')")
    s.add_argument("--out", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("report", help="write a self-contained HTML report of a run (opens offline)")
    s.add_argument("run", help="run id or run directory")
    s.add_argument("--out", required=True, help="the .html file to write")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("runs", help="list runs in the workspace")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_runs)

    s = sub.add_parser("settings", help="list the TL_* environment settings, their defaults and current values")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_settings)

    s = sub.add_parser("advise", help="rank backbones for a dataset before training (LogME + quick probe)")
    s.add_argument("data")
    s.add_argument("--backbones", default=None, help="comma-separated names (default: every offline backbone)")
    s.add_argument("--max-per-class", type=int, default=50, help="images per class to embed (0 = all)")
    s.add_argument("--val-split", type=float, default=d.val_split, help=field_help("val_split"))
    s.add_argument("--seed", type=int, default=d.seed, help=field_help("seed"))
    s.add_argument("--quiet", action="store_true", help="no progress on stderr")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_advise)

    s = sub.add_parser("audit", help="find duplicates, train/val leakage, imbalance, odd images, label errors")
    s.add_argument("data")
    s.add_argument("--backbone", default=d.backbone, help=field_help("backbone"))
    s.add_argument("--val-split", type=float, default=d.val_split, help="the split you will train with")
    s.add_argument("--seed", type=int, default=d.seed, help=field_help("seed"))
    s.add_argument("--near-threshold", type=float, default=0.90,
                   help="feature cosine similarity of near-duplicate candidates (a pixel check confirms them)")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_audit)

    s = sub.add_parser("lab", help="transfer-vs-scratch learning curve (accuracy against images per class)")
    s.add_argument("data")
    s.add_argument("--backbone", default=d.backbone, help=field_help("backbone"))
    s.add_argument("--sizes", type=_sizes_arg, default=[5, 10, 20, None], help="images per class, e.g. 5,10,20,all")
    s.add_argument("--epochs", type=int, default=4, help="epochs of the fine-tuned and scratch arms")
    s.add_argument("--image-size", type=_image_size_arg, default=128, help="input pixels, or 'native'")
    s.add_argument("--arms", default="linear,finetune,scratch")
    s.add_argument("--val-split", type=float, default=d.val_split, help=field_help("val_split"))
    s.add_argument("--seed", type=int, default=d.seed, help=field_help("seed"))
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lab)

    s = sub.add_parser("explain", help="Grad-CAM heat-map of one image under a run, as a PNG overlay")
    s.add_argument("run", metavar="RUN_OR_BUNDLE")
    s.add_argument("image")
    s.add_argument("--out", required=True, help="the .png file to write")
    s.add_argument("--target", default=None, help="class to explain (default: the predicted class)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--device", default="auto", help="where the model runs: auto (CUDA, then Apple MPS, then the "
                   "CPU), cpu, cuda, cuda:N or mps")
    s.set_defaults(func=cmd_explain)

    s = sub.add_parser("calibrate", help="fit temperature scaling on validation and save it with the run")
    s.add_argument("run", help="run id or run directory")
    s.add_argument("--dry-run", action="store_true", help="measure only; do not save the temperature")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_calibrate)

    s = sub.add_parser("openset", help="show a run's open-set threshold (when an image is called unknown), or set it")
    s.add_argument("run", help="run id or run directory")
    s.add_argument("--threshold", type=float, default=None,
                   help="save this threshold on ood_score (0-10; 1.0 = the calibrated one: the larger of the content "
                        "and style distances, each as a multiple of its own threshold; runs from before version 2: a "
                        "cosine distance, 0-2): images above it are called unknown; predictions use it from then on")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_openset)

    _add_data_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tl-core``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _printed["json"] = False

    def fail(message: str, status: int, as_json: bool) -> int:
        # one error line on stderr; with --json also the one JSON document a script parses (unless the command
        # already wrote its result)
        sys.stderr.write(f"{message}\n")
        if as_json and not _printed["json"]:
            with contextlib.suppress(OSError, ValueError):
                emit(argparse.Namespace(json=True), {"error": message.removeprefix("error: "), "exit_status": status})
        return status

    try:
        args = build_parser().parse_args(argv)
    except _UsageError as e:
        return fail(f"error: {e}", 2, "--json" in argv)
    as_json = bool(getattr(args, "json", False))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.func is not cmd_settings:  # a mistyped TL_* setting is one error line, before any work
            from .settings import validate_all

            validate_all()
        return args.func(args)
    except CancelledError as e:
        return fail(f"error: {e}", 1, as_json)
    except TLError as e:
        return fail(f"error: {e}", 2, as_json)
    except KeyboardInterrupt:
        return fail("error: interrupted", 1, as_json)
    except BrokenPipeError:  # `tl-core ... | head`: the reader left; nothing to report
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug: say so in one line, details with -v
        log.debug("crash", exc_info=True)
        code = fail(f"internal error: {type(e).__name__}: {e}", 1, as_json)
        if args.verbose:
            import traceback

            traceback.print_exc()
        return code


def run() -> None:
    """The ``tl-core`` command (and ``python -m tl_core.cli``): :func:`main`, then a quick exit.

    The interpreter's own teardown of the several thousand modules that torch and timm load takes ~0.6 s on a
    2-core machine, a sixth of a warm re-train. The command's work is done and written by then, so the exit
    handlers run (temporary folders, DataLoader workers, logging), the streams are flushed, and the process
    leaves without the teardown. Tests call :func:`main` itself.
    """
    code = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; elsewhere, the ordinary exit
    if run_exit_handlers is None:
        sys.exit(code)
    logging.shutdown()
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that left (`| head`), a closed stream
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
