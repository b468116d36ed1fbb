"""The one export dispatcher: every format a run can be exported in, the name it is written under, and who writes
it. ``tl-core export`` (tl_core/cli.py) and the app's export task (tl_core/runs/kinds.py) both call
:func:`export_model`; a new format is added here (and described in ``tl_core.config.EXPORT_FORMATS``).

- ``bundle``, ``onnx``, ``torchscript``: :func:`tl_core.share.export.export_run` (one file, plus a sidecar).
- ``webpage``: :func:`tl_core.share.webpage.export_webpage` (a folder with ``index.html``, and a zip of it).
- ``tflite``: :func:`tl_core.share.tflite.export_tflite` (float32 and int8 ``.tflite`` files, plus a sidecar;
  needs the ``.[edge]`` extra).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..config import EXPORT_FORMATS
from ..errors import ExportError

__all__ = ["FORMAT_EXTENSIONS", "export_model", "export_name", "export_summary"]

#: What each format writes: a file extension, or ``None`` for a folder (the web page).
FORMAT_EXTENSIONS: dict[str, str | None] = {"bundle": "zip", "onnx": "onnx", "torchscript": "pt",
                                            "tflite": "tflite", "webpage": None}


def export_name(run_name: str, fmt: str) -> str:
    """The file (or folder) name an export of run ``run_name`` gets in a folder of exports.

    Args:
        run_name: the run directory's name.
        fmt: one of :data:`FORMAT_EXTENSIONS`.
    Returns:
        ``tl-studio-<run>.<ext>``, or ``page`` for the web page's folder.
    """
    _check(fmt)
    ext = FORMAT_EXTENSIONS[fmt]
    return "page" if ext is None else f"tl-studio-{run_name}.{ext}"


def _check(fmt: str) -> None:
    if fmt not in EXPORT_FORMATS or fmt not in FORMAT_EXTENSIONS:
        raise ExportError(f"Unknown export format {fmt!r}; use one of {', '.join(FORMAT_EXTENSIONS)}.")


def export_model(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    """Export a run (or a bundle) in ``fmt``.

    Args:
        run_dir: the run directory (or a bundle zip).
        fmt: bundle | onnx | torchscript | tflite | webpage.
        out: the file to write (the folder for ``webpage``); an existing directory gets the default name inside it
            for the file formats.
        **kwargs: passed to the format's exporter (e.g. ``verify_images``).
    Returns:
        The exporter's result (``path``, ``format``, ``bytes``, ``verification`` ...) plus ``written``: every file
        to hand over, model first (the web page: its zip).
    Raises:
        ExportError: an unknown format, or the exporter's own errors (missing extra, failed verification).
    """
    _check(fmt)
    if fmt == "webpage":
        from .webpage import export_webpage

        res = export_webpage(run_dir, out, **kwargs)
        return {**res, "written": [res["zip"]]}
    if fmt == "tflite":
        from .tflite import export_tflite

        res = export_tflite(run_dir, out, **kwargs)
        int8 = [res["int8"]["path"]] if res.get("int8") else []
        return {**res, "written": [res["path"], *int8, res["sidecar"]]}
    from .export import export_run

    res = export_run(run_dir, fmt, out, **kwargs)
    return {**res, "written": [res["path"]] + ([res["sidecar"]] if res.get("sidecar") else [])}


def export_summary(res: dict[str, Any]) -> list[str]:
    """What ``tl-core export`` prints for a result of :func:`export_model` (without ``--json``)."""
    if res["format"] == "webpage":
        return [f"wrote {res['index']} ({res['bytes'] / 1e6:.1f} MB) and {res['zip']}; open it in a browser, offline"]
    lines = ["wrote " + ", ".join(str(Path(p)) for p in res["written"])]
    v = res.get("verification")
    if v and res["format"] == "tflite":
        lines.append(f"float32 verified with {v['runtime']} on {v['images']} {v['image_source']}: top-1 agrees with "
                     f"the run on {v['top1_agree']}/{v['images']} (needs {v['min_agreement']:.0%}), max probability "
                     f"difference {v['max_prob_diff']:.2e}")
        q = res.get("int8")
        if q:
            acc = (f"; accuracy {v['accuracy']:.1%} -> {q['accuracy']:.1%} ({q['accuracy_change_points']:+.1f} "
                   "points)" if q.get("accuracy") is not None and v.get("accuracy") is not None else "")
            lines.append(f"int8 ({q['quantisation']}, calibrated on {q['calibration']['images']} "
                         f"{q['calibration']['source']}): top-1 agrees on {q['top1_agree']}/{v['images']}{acc}")
    elif v:
        lines.append(f"verified with {v['runtime']} on {v['images']} {v['image_source']}: top-1 agrees on "
                     f"{v['top1_agree']}/{v['images']}, max probability difference {v['max_prob_diff']:.2e} "
                     f"(allowed {v['tolerance']:.0e})")
    return lines
