"""``tl-core serve``: a trained run or bundle as an HTTP API (FastAPI on uvicorn).

Endpoints:

- ``POST /predict``: multipart image files in the field ``files`` -> ``{"predictions": [rows]}``, one row per
  file in the order sent, each ``{"file": <its name>, ...}`` plus exactly the fields of a ``tl-core predict
  --json`` row (label, confidence, top_k, unknown, ood_score, ood_reason, ood_distances, nearest; multi-label
  models add labels and probs). The rows come from :func:`tl_core.share.predict.predict_pil`, the function the
  app's Try it uses.
- ``GET /health``: open to everyone (no API key): the server is up, and how many requests wait.
- ``GET /model``: classes, input size and preprocessing, thresholds, what the scores mean, the server's limits.
- ``GET /docs``, ``GET /openapi.json``: the OpenAPI description (FastAPI's).

A request is all or nothing: if one of its files is not a usable image, or is too large, the whole request is
refused with a 4xx whose ``detail`` is one sentence naming the file, and nothing is predicted (a client never
has to pair rows with errors). Every error is ``{"detail": "<one sentence>"}``.

Concurrency: uploads are read and decoded on the server's thread pool (at most ``ServeLimits.decoders`` at
once), resized there to the model's resize size (the same numbers as resizing later), then queued to one
inference thread (:class:`tl_core.share.batching.MicroBatcher`) that batches images from requests arriving
within a few milliseconds. The queue is bounded; when it is full the answer is 503 at once.
"""

# no ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (``list[UploadFile]``,
# imported inside :func:`create_app`) as objects when the routes are made
import asyncio
import hmac
import importlib.util
import io
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..data.images import MAX_IMAGE_PIXELS, image_from_bytes, resize_shorter
from ..errors import DatasetError, ServeError, ServerBusy
from .batching import MicroBatcher
from .loading import TrainedModel

__all__ = ["ServeLimits", "create_app", "model_description", "run_server", "post_images", "SCORES",
           "require_serve_extra"]

#: What each field of a prediction row means (``GET /model`` gives it; docs/serve.md repeats it).
SCORES = {
    "file": "the uploaded file's name, as sent",
    "label": "the predicted class (multi-label: the predicted labels joined by ';')",
    "confidence": "the predicted class's probability, softmax(logits / T) with the run's calibrated temperature T",
    "top_k": "the most probable classes, [{label, confidence}], most probable first",
    "unknown": "true: the image is unlike the training images (label is still the closest class); null: the "
               "model has no open-set files",
    "ood_score": "how far the image is from the training images; 1.0 = the calibrated threshold, above it the "
                 "image is unknown",
    "ood_reason": "why it is unknown: style (another kind of picture), content (something else shown) or both; "
                  "null when not unknown",
    "ood_distances": "{content, style}: each distance divided by its own threshold",
    "nearest": "up to 3 nearest training images by content [{path, label, distance}], the path relative to the "
               "training set's folder, never the server's own (null when the model keeps no paths)",
}


@dataclass(frozen=True)
class ServeLimits:
    """What one server accepts and how it batches.

    Attributes:
        max_files: files in one request (more: 413).
        max_file_bytes: bytes of one file (more: 413).
        max_body_bytes: bytes of one request body, everything included (more: 413, refused while it streams in).
        max_pixels: pixels of one image (more: 413 before it is decoded; a decompression bomb stops here).
        max_batch: images in one forward pass.
        window_ms: how long the inference loop waits for more requests to fill a batch.
        max_queue: requests waiting for the model (more: 503 at once).
        decoders: uploads decoded at the same time.
    """

    max_files: int = 32
    max_file_bytes: int = 10 * 1024**2
    max_body_bytes: int = 64 * 1024**2
    max_pixels: int = 25_000_000
    max_batch: int = 32
    window_ms: float = 5.0
    max_queue: int = 64
    decoders: int = 2


def _json_response(status: int, detail: str, headers: dict[str, str] | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _body_too_large(max_bytes: int) -> str:
    return (f"The request body is larger than this server's {max_bytes / 1e6:.0f} MB limit; send fewer or smaller "
            "images per request.")


class _BodyLimit:
    """ASGI middleware: a request body above ``max_bytes`` gets 413 with one sentence, by its Content-Length
    before anything is read, or as soon as a streamed (chunked) body passes the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        from starlette.exceptions import HTTPException

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _json_response(413, _body_too_large(self.max_bytes))(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # an HTTPException: the form parser passes it on, the app answers it
                    raise HTTPException(413, _body_too_large(self.max_bytes))
            return message

        await self.app(scope, limited_receive, send)


def require_serve_extra() -> None:
    """Check that FastAPI, uvicorn and python-multipart are installed.

    Raises:
        ServeError: one is missing; the message says how to install them.
    """
    missing = []
    for modules, package in ((("fastapi",), "fastapi"), (("uvicorn",), "uvicorn"),
                             (("python_multipart", "multipart"), "python-multipart")):  # its new name, its old
        if not any(importlib.util.find_spec(m) for m in modules):
            missing.append(package)
    if missing:
        raise ServeError(f"tl-core serve needs {', '.join(missing)}: install them with "
                         "`pip install 'tl-studio[serve]'` (or `pip install fastapi uvicorn python-multipart`).")


def model_description(tm: TrainedModel, limits: ServeLimits) -> dict[str, Any]:
    """What ``GET /model`` answers: classes, input, thresholds, what the scores mean, and the server's limits."""
    from ..models.openset import UNKNOWN_NOTE, describe

    meta, pre = tm.meta, tm.pre
    open_set = None
    if tm.open_set is not None:
        rec = tm.open_set.record
        open_set = {"threshold": tm.open_set.threshold, "version": tm.open_set.version,
                    "calibration": rec.get("calibration"), "quantile": rec.get("quantile"),
                    "style": tm.open_set.style is not None, "meaning": describe(rec)}
    return {
        "model": Path(tm.source).name,
        "backbone": meta.backbone,
        "arch": meta.arch,
        "classes": list(meta.classes),
        "num_classes": meta.num_classes,
        "multi_label": meta.multi_label,
        # multi-label: each label's decision threshold on its probability; single-label: the top class wins
        "thresholds": dict(zip(meta.classes, meta.thresholds)) if meta.multi_label and meta.thresholds else None,
        "temperature": meta.temperature,
        "input": {"size": pre.input_size, "resize": pre.resize, "interpolation": pre.interpolation,
                  "mean": list(pre.mean), "std": list(pre.std),
                  "note": "any image Pillow reads (PNG, JPEG, WebP, GIF, BMP, TIFF); EXIF rotation applied, alpha on "
                          f"white, resized so its shorter side is {pre.resize} px, then centre-cropped to "
                          f"{pre.input_size} px"},
        "open_set": open_set,
        "open_set_note": None if open_set else UNKNOWN_NOTE,
        "scores": SCORES,
        "limits": asdict(limits),
    }


def _check_key(api_key: str):
    """A FastAPI dependency: the request carries ``api_key`` (X-API-Key, or Authorization: Bearer), compared in
    constant time. Declared as OpenAPI security schemes, so /docs offers an "Authorize" button."""
    from fastapi import HTTPException, Security
    from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

    expected = api_key.encode("utf-8")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the key given to `tl-core serve --api-key`")
    bearer = HTTPBearer(auto_error=False, description="the same key as a bearer token")

    def check(x_api_key: str | None = Security(header),
              authorization: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = x_api_key or (authorization.credentials if authorization else None) or None
        # compare_digest: the time taken does not depend on where the key and the guess differ
        if given is None or not hmac.compare_digest(given.encode("utf-8"), expected):
            raise HTTPException(401, "This server needs an API key: send it in the X-API-Key header (or "
                                     "Authorization: Bearer KEY)." if given is None else
                                     "The API key is wrong; ask the server's owner for the right one.",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def _file_name(name: str | None, n: int) -> str:
    """The upload's name as it will be echoed: printable, at most 200 characters; ``file N`` when it has none."""
    name = "".join(c for c in (name or "") if c.isprintable())[:200]
    return name or f"file {n + 1}"


class _BadUpload(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def _decode(data: bytes, name: str, tm: TrainedModel, limits: ServeLimits) -> Any:
    """One upload as an RGB image resized for the model (``predict_pil`` then crops it; the same numbers).

    Raises:
        _BadUpload: 413 for a file over the byte or pixel limit, 422 for anything that is not a usable image.
    """
    if not data:
        raise _BadUpload(422, f"{name}: the file is empty (0 bytes).")
    if len(data) > limits.max_file_bytes:
        raise _BadUpload(413, f"{name}: {len(data) / 1e6:.1f} MB is above this server's "
                              f"{limits.max_file_bytes / 1e6:.0f} MB limit per file; downscale it first.")
    from PIL import Image

    cap = min(limits.max_pixels, MAX_IMAGE_PIXELS)
    too_big = f"above this server's limit of {cap / 1e6:.0f} megapixels; downscale it first."
    try:  # the header alone: a decompression bomb is refused before its pixels are allocated
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError:  # Pillow's own guard, far above the cap
        raise _BadUpload(413, f"{name}: the image is {too_big}") from None
    except Exception:
        w = h = 0  # not an image: image_from_bytes below says what is wrong
    if w * h > cap:
        raise _BadUpload(413, f"{name}: {w}x{h} is {w * h / 1e6:.0f} megapixels, {too_big}")
    try:
        img = image_from_bytes(data, name)
    except DatasetError as e:
        raise _BadUpload(422, str(e)) from None
    pre = tm.pre
    return resize_shorter(img, pre.resize, pre.interpolation)


def create_app(model: TrainedModel, api_key: str | None = None, limits: ServeLimits | None = None,
               top_k: int = 3, predict: Callable[[list[Any]], list[dict[str, Any]]] | None = None) -> Any:
    """The FastAPI application serving ``model``.

    Args:
        model: the loaded run or bundle (:func:`tl_core.share.loading.load_model`).
        api_key: when given, ``/predict`` and ``/model`` need it (``X-API-Key`` or ``Authorization: Bearer``);
            ``/health`` and the docs stay open.
        limits: sizes, batching and queue (:class:`ServeLimits`).
        top_k: classes listed in each row's ``top_k``.
        predict: the batch function (images -> rows); default :func:`tl_core.share.predict.predict_pil` on
            ``model`` (tests pass a slow one to fill the queue).
    Returns:
        The app; its inference thread starts with the first request (or the app's startup) and stops at its
        shutdown.
    Raises:
        ServeError: FastAPI, uvicorn or python-multipart is missing.
    """
    require_serve_extra()
    from fastapi import Depends, FastAPI, File, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .predict import predict_pil

    limits = limits or ServeLimits()
    batcher = MicroBatcher(predict or (lambda images: predict_pil(model, images, top_k=top_k)),
                           max_batch=limits.max_batch, window_s=limits.window_ms / 1000, max_queue=limits.max_queue)
    decoding = asyncio.Semaphore(max(1, limits.decoders))
    guarded = [Depends(_check_key(api_key))] if api_key else []  # /predict and /model; /health stays open

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    name = Path(model.source).name
    bank_root = model.open_set.record.get("bank_root") if getattr(model, "open_set", None) is not None else None
    app = FastAPI(title=f"TL Studio model {name}", lifespan=lifespan,
                  description="Image classification with a model trained in TL Studio. `POST /predict` with image "
                              "files in the multipart field `files`; every error is `{\"detail\": \"one sentence\"}`.")
    app.state.batcher = batcher
    app.state.limits = limits
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _json_response(422, "Send the images as multipart/form-data in the field 'files' (with "
                                   "curl: -F files=@cat.jpg).")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "The request was refused."
        return _json_response(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # a bug: one sentence for the client, the trace in the log
        return _json_response(500, f"The server failed on this request ({type(exc).__name__}); it keeps running.")

    @app.get("/health", summary="Whether the server is up (no API key needed)")
    async def health() -> dict[str, Any]:
        s = batcher.stats
        return {"status": "ok", "model": name, "waiting": batcher.waiting, "max_queue": limits.max_queue,
                "served": {"requests": s.jobs, "images": s.images, "batches": s.batches,
                           "largest_batch": s.largest_batch}}

    @app.get("/model", summary="Classes, input, thresholds and what the scores mean", dependencies=guarded)
    async def describe_model() -> dict[str, Any]:
        return model_description(model, limits)

    @app.post("/predict", summary="Classify images", dependencies=guarded,
              responses={401: {"description": "API key missing or wrong"},
                         413: {"description": "too many files, or a file, image or body too large"},
                         422: {"description": "a file is not a usable image (the whole request is refused)"},
                         503: {"description": "the queue is full; try again in a few seconds"}})
    async def predict_files(files: list[UploadFile] = File(..., description="one or more image files")
                            ) -> dict[str, Any]:
        if len(files) > limits.max_files:
            return _json_response(413, f"A request holds at most {limits.max_files} files and this one has "
                                       f"{len(files)}; send them in several requests.")
        images, names = [], []
        for n, f in enumerate(files):
            names.append(_file_name(f.filename, n))
            data = await f.read(limits.max_file_bytes + 1)
            try:
                async with decoding:
                    images.append(await run_in_threadpool(_decode, data, names[-1], model, limits))
            except _BadUpload as e:
                return _json_response(e.status, e.detail.rstrip(".") + "; nothing in this request was predicted.")
        try:
            future = batcher.submit(images)
        except ServerBusy as e:
            return _json_response(503, str(e), {"Retry-After": "2"})
        try:
            rows = await asyncio.wrap_future(future)
        except Exception as e:  # the model failed on this batch; the server carries on
            return _json_response(500, f"The model failed on this request ({type(e).__name__}: {e}); the server "
                                       "keeps running.")
        return {"predictions": [{"file": n, **_public_row(r, bank_root)} for n, r in zip(names, rows)]}

    return app


def _public_row(row: dict[str, Any], root: str | None) -> dict[str, Any]:
    """``row`` as a client may see it: each nearest training image's path relative to the training set's folder
    (or its file name when it lay outside it), so a response never tells where files lie on the server."""
    near = row.get("nearest")
    if not near:
        return row
    prefix = root.rstrip("/") + "/" if root else None
    out = []
    for n in near:
        p = str(n.get("path") or "")
        p = p[len(prefix):] if prefix and p.startswith(prefix) else Path(p).name
        out.append({**n, "path": p})
    return {**row, "nearest": out}


def post_images(client: Any, files: "list[Path | tuple[str, bytes]]", path: str = "/predict", **kw: Any) -> Any:
    """A client's side of ``POST /predict``: ``files`` sent as multipart fields named ``files``, in order.

    Args:
        client: an ``httpx.Client`` (or FastAPI's ``TestClient``) whose base URL is the server.
        files: image files, or (name, bytes) pairs (the name is the row's ``file``).
        path: the endpoint.
        **kw: passed to ``client.post`` (headers, timeout).
    Returns:
        The client's response.
    """
    parts = [(f.name, f.read_bytes()) if isinstance(f, Path) else f for f in files]
    return client.post(path, files=[("files", (name, data, "application/octet-stream")) for name, data in parts],
                       **kw)


def run_server(model: TrainedModel, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               limits: ServeLimits | None = None, top_k: int = 3, announce: Callable[[str], None] | None = None
               ) -> None:
    """Serve ``model`` until interrupted (Ctrl-C or SIGTERM).

    The socket is bound here first, so a port in use is a clear error and ``port=0`` takes a free port (the
    announcement says which). The model runs once on a blank image before the first request is taken.

    Args:
        model, api_key, limits, top_k: as :func:`create_app`.
        host, port: where to listen.
        announce: called with one line once the server listens (default: printed on stderr).
    Raises:
        ServeError: the port cannot be bound, or the serve extra is missing.
    """
    require_serve_extra()
    import uvicorn
    from PIL import Image

    from .predict import predict_pil

    limits = limits or ServeLimits()
    predict_pil(model, [Image.new("RGB", (model.pre.resize, model.pre.resize))], top_k=top_k)  # warm-up
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"Cannot listen on {host}:{port} ({e.strerror or e}); choose another --port (0 takes a "
                         "free one) or stop the program using it.") from None
    bound = sock.getsockname()[1]
    app = create_app(model, api_key=api_key, limits=limits, top_k=top_k)
    # a hard cap on open connections beyond the queue: uvicorn answers 503 past it
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            limit_concurrency=limits.max_queue * 2 + 32, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    line = (f"serving {Path(model.source).name} on http://{shown}:{bound} (API docs at /docs"
            + (", API key required" if api_key else "") + "); Ctrl-C stops it")
    orig_startup = server.startup

    async def startup(sockets=None):
        await orig_startup(sockets=sockets)
        (announce or (lambda s: (sys.stderr.write(s + "\n"), sys.stderr.flush())))(line)

    server.startup = startup  # the line appears once uvicorn accepts connections
    server.run(sockets=[sock])
