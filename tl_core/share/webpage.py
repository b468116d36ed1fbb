"""The in-browser runtime (ONNX Runtime Web) and the ``webpage`` export: a folder that classifies images offline.

The runtime is npm's ``onnxruntime-web`` at :data:`ORT_WEB_VERSION`, fetched once at setup by
:func:`fetch_runtime` (``make web-runtime``; ``make venv`` runs it) into :func:`runtime_dir`, then used offline.
Only its single-threaded WebAssembly build is kept (three files, see :data:`ORT_WEB_FILES`, each checked against
its pinned SHA-256).

:func:`export_webpage` writes ``DIR/index.html`` beside the run's verified ONNX graph and that runtime, both
wrapped in ``.js`` files (base64) so the page works from ``file://`` (where a page may not ``fetch()`` its own
files) as well as from any static host, and ``DIR.zip`` of the folder. The page's JavaScript
(``web/tlstudio.js``) preprocesses exactly like the engine (see docs/webpage.md) and offers
``window.tlstudio.ready`` and ``window.tlstudio.predict(img)``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from ..errors import ExportError
from ..settings import setting
from .export import export_run

__all__ = ["ORT_WEB_VERSION", "ORT_WEB_FILES", "runtime_dir", "find_runtime", "fetch_runtime", "export_webpage",
           "page_assets", "web_meta"]

#: The pinned onnxruntime-web release (npm).
ORT_WEB_VERSION = "1.31.1"

#: The files kept from the npm package (path inside it -> SHA-256): the UMD loader of the WebAssembly-only
#: build, its Emscripten glue (an ES module) and the SIMD WebAssembly binary (also runs single-threaded).
ORT_WEB_FILES = {
    "dist/ort.wasm.min.js": "b8a78c408c40da65fdc8ba0846f7b2948e92a4c6d6b23cc8e4165e428ad95443",
    "dist/ort-wasm-simd-threaded.mjs": "30ed0b5cd1182ede931fea448afb567d4dc705ec957af09f108a2be5f770dac3",
    "dist/ort-wasm-simd-threaded.wasm": "4b884c203b0fa48d057be3332c65513ff85aa3c5bddd6946acc0fab7ecda001d",
}

#: The page's own files (index.html, tlstudio.js) and the runtime's default home (``vendor/``, ignored by git).
WEB_DIR = Path(__file__).resolve().parent / "web"

_MISSING = ("The in-browser runtime (onnxruntime-web {v}) is missing from {d}: run `make web-runtime` "
            "(it fetches it once from npm) and try again.")


def runtime_dir() -> Path:
    """Where the runtime's files are: ``$TL_ORT_WEB_DIR`` when set, else ``tl_core/share/web/vendor/``."""
    return setting("TL_ORT_WEB_DIR", WEB_DIR / "vendor" / f"onnxruntime-web-{ORT_WEB_VERSION}")


def find_runtime() -> Path:
    """The runtime's folder, checked.

    Returns:
        The folder holding the files of :data:`ORT_WEB_FILES` (by their base names).
    Raises:
        ExportError: a file is missing (one sentence saying how to fetch it).
    """
    d = runtime_dir()
    if not all((d / Path(f).name).is_file() for f in ORT_WEB_FILES):
        raise ExportError(_MISSING.format(v=ORT_WEB_VERSION, d=d))
    return d


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch_runtime(dest: str | os.PathLike | None = None, npm: str = "npm", force: bool = False) -> dict[str, Any]:
    """Fetch onnxruntime-web from the npm registry (``npm pack``) and keep only :data:`ORT_WEB_FILES`.

    Args:
        dest: the folder to fill (default :func:`runtime_dir`).
        npm: the npm command.
        force: fetch again even when the files are there.
    Returns:
        {dir, version, files: {name: bytes}, fetched (False when it was already there)}
    Raises:
        ExportError: npm is missing or fails, or a file's SHA-256 differs from the pinned one.
    """
    dest = Path(dest) if dest else runtime_dir()
    names = {f: Path(f).name for f in ORT_WEB_FILES}
    have = all((dest / n).is_file() for n in names.values())
    if have and not force:
        return {"dir": str(dest), "version": ORT_WEB_VERSION, "fetched": False,
                "files": {n: (dest / n).stat().st_size for n in names.values()}}
    if shutil.which(npm) is None:
        raise ExportError(f"npm is not installed: install Node.js's npm (e.g. `apt-get install npm`) so that "
                          f"onnxruntime-web {ORT_WEB_VERSION} can be fetched, then run `make web-runtime` again.")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tl-ort-web-") as tmp:
        try:
            subprocess.run([npm, "pack", f"onnxruntime-web@{ORT_WEB_VERSION}", "--silent"], cwd=tmp, check=True,
                           capture_output=True, text=True, timeout=600)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            err = (getattr(e, "stderr", "") or "").strip().splitlines()[-1:] or [str(e)]
            raise ExportError(f"npm could not fetch onnxruntime-web {ORT_WEB_VERSION} ({err[0]}); check that the "
                              "npm registry is reachable and run `make web-runtime` again.") from None
        tgz = next(Path(tmp).glob("onnxruntime-web-*.tgz"))
        with tarfile.open(tgz) as tf:
            for inner, name in names.items():
                member = tf.getmember(f"package/{inner}")
                src = tf.extractfile(member)
                assert src is not None
                staged = Path(tmp) / name
                with open(staged, "wb") as f:
                    shutil.copyfileobj(src, f)
                got = _sha256(staged)
                if got != ORT_WEB_FILES[inner]:
                    raise ExportError(f"onnxruntime-web {ORT_WEB_VERSION}'s {inner} has SHA-256 {got[:12]}…, not the "
                                      "pinned one; the package was changed or damaged: do not use it.")
        for name in names.values():
            os.replace(Path(tmp) / name, dest / name)
    return {"dir": str(dest), "version": ORT_WEB_VERSION, "fetched": True,
            "files": {n: (dest / n).stat().st_size for n in names.values()}}


def web_meta(sidecar: dict[str, Any], top_k: int = 3) -> dict[str, Any]:
    """What the page's JavaScript needs from an ONNX export's sidecar: classes, preprocessing, the multi-label
    thresholds and the open-set threshold (``unknown = ood_score > threshold``, as ``tl-core predict``)."""
    pre = sidecar["preprocessing"]
    os_ = sidecar.get("open_set")
    return {
        "format": "tl-studio-webpage/1",
        "classes": sidecar["classes"],
        "source_run": sidecar.get("source_run"),
        "backbone": sidecar.get("backbone"),
        "top_k": int(top_k),
        "preprocess": {k: pre[k] for k in ("input_size", "resize", "interpolation", "mean", "std")},
        "multi_label": bool(sidecar.get("multi_label", False)),
        "thresholds": sidecar.get("thresholds"),
        "open_set": None if os_ is None else {"threshold": os_["threshold"], "version": os_["version"]},
        "outputs": sorted(sidecar["outputs"]),
    }


def _js_b64(var: str, payload: dict[str, Any], blobs: dict[str, bytes]) -> str:
    """A script that sets ``window[var]`` to ``payload`` plus each blob as a base64 string."""
    body = json.dumps(payload)[:-1]
    for k, data in blobs.items():
        body += f', "{k}": "' + base64.b64encode(data).decode("ascii") + '"'
    return f"window.{var} = {body}}};\n"


def page_assets(onnx_file: str | os.PathLike, meta: dict[str, Any]) -> dict[str, bytes]:
    """The files of a web page that runs ``onnx_file``: {relative name: bytes}.

    Args:
        onnx_file: a verified ONNX export (:func:`tl_core.share.export.export_run`).
        meta: :func:`web_meta` of its sidecar.
    Raises:
        ExportError: the runtime is missing.
    """
    rt = find_runtime()
    glue = (rt / "ort-wasm-simd-threaded.mjs").read_text(encoding="utf-8")
    return {
        "index.html": (WEB_DIR / "index.html").read_bytes(),
        "tlstudio.js": (WEB_DIR / "tlstudio.js").read_bytes(),
        "ort/ort.wasm.min.js": (rt / "ort.wasm.min.js").read_bytes(),
        "ort/ort-wasm.js": _js_b64("TLSTUDIO_ORT_WASM", {"version": ORT_WEB_VERSION, "mjs": glue},
                                   {"wasm": (rt / "ort-wasm-simd-threaded.wasm").read_bytes()}).encode(),
        "model.js": _js_b64("TLSTUDIO_MODEL", {"meta": meta}, {"onnx": Path(onnx_file).read_bytes()}).encode(),
    }


def export_webpage(run_dir: str | os.PathLike, out: str | os.PathLike, *, top_k: int = 3,
                   **export_kwargs: Any) -> dict[str, Any]:
    """Write ``out/index.html`` with the run's verified ONNX graph and the runtime, and ``out.zip`` of it.

    Args:
        run_dir: the run (or a bundle).
        out: the folder to write (created; files of an earlier export in it are replaced).
        top_k: how many classes a row lists.
        **export_kwargs: passed to :func:`tl_core.share.export.export_run` (verification images, exporter).
    Returns:
        {path (the folder), index, zip, format, bytes (the folder's files), zip_bytes, files {name: bytes},
        verification (of the ONNX graph), cached (the graph came from the exports cache), runtime}
    Raises:
        ExportError: the runtime is missing, or the ONNX export failed its verification.
    """

    find_runtime()  # fail before the slow ONNX export
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder for the web page.")
    with tempfile.TemporaryDirectory(prefix="tl-webpage-") as tmp:
        info = export_run(run_dir, "onnx", Path(tmp) / "model.onnx", **export_kwargs)
        if len(list(Path(tmp).iterdir())) > 2:
            raise ExportError("The model is too large for one ONNX file (it has external data), so it cannot "
                              "be put in a web page; export it as onnx instead.")
        sidecar = json.loads(Path(info["sidecar"]).read_text())
        files = page_assets(info["path"], web_meta(sidecar, top_k))
        files["model.onnx.json"] = json.dumps(sidecar, indent=2).encode()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        p = out / name
        p.parent.mkdir(parents=True, exist_ok=True)
        staged = p.with_name(p.name + ".tmp")
        staged.write_bytes(data)
        os.replace(staged, p)
    zpath = out.with_name(out.name + ".zip")
    staged_zip = zpath.with_name(zpath.name + ".tmp")
    with zipfile.ZipFile(staged_zip, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(files.items()):
            z.writestr(f"{out.name}/{name}", data)
    os.replace(staged_zip, zpath)
    return {"path": str(out), "index": str(out / "index.html"), "zip": str(zpath), "format": "webpage",
            "bytes": sum(len(d) for d in files.values()), "zip_bytes": zpath.stat().st_size,
            "files": {k: len(v) for k, v in sorted(files.items())}, "verification": info["verification"],
            "cached": info["cached"],
            "runtime": f"onnxruntime-web {ORT_WEB_VERSION} (wasm, single-threaded)"}
