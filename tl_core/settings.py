"""The ``TL_*`` environment settings: one table (name, type, default, help), validated in one place.

Every ``TL_*`` variable the engine reads is a :class:`Setting` in :data:`SETTINGS`, and every module reads it
through :func:`setting` (a test checks that no other module reads ``os.environ`` for a ``TL_*`` name, and that
every setting is documented in ``docs/``). A value that does not parse is a :class:`~tl_core.errors.ConfigError`
naming the variable and what it allows, never a crash deep inside a computation. ``tl-core settings [--json]``
lists them with their current values. (datasette's settings table is the model.)

Values are read from the environment at each call, not cached: tests and the worker launcher set them per
process or per test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError

__all__ = ["Setting", "SETTINGS", "setting", "describe", "validate_all", "usable_cores"]


def usable_cores() -> int:
    """Cores this process may use (the affinity mask in a container, not the host's count); ``TL_THREADS``' default."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def _positive_int(raw: str) -> int:
    v = int(raw)
    if v < 1:
        raise ValueError
    return v


def _non_negative_int(raw: str) -> int:
    v = int(raw)
    if v < 0:
        raise ValueError
    return v


def _positive_float(raw: str) -> float:
    v = float(raw)
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError
    return v


def _non_negative_float(raw: str) -> float:
    v = float(raw)
    if not v >= 0 or v == float("inf"):
        raise ValueError
    return v


def _text(raw: str) -> str:
    return raw


def _path(raw: str) -> Path:
    return Path(raw).expanduser()


def _engine(raw: str) -> str:
    v = raw.lower()
    if v not in ("auto", "torch", "onnx"):
        raise ValueError
    return v


def _auto_on_off(raw: str) -> str:
    v = raw.lower()
    if v not in ("auto", "on", "off"):
        raise ValueError
    return v


def _train_procs(raw: str) -> int | str:
    v = raw.lower()
    return "all" if v == "all" else _positive_int(v)


@dataclass(frozen=True)
class Setting:
    """One ``TL_*`` environment variable.

    Attributes:
        name: the variable, e.g. ``TL_MAX_WORKERS``.
        type: what it holds, in words a user reads (``int >= 1``, ``auto|torch|onnx``, ``path``, ...).
        default: its value when unset or empty (``None``: computed at run time, ``default_text`` says how).
        help: one sentence on what it sets.
        parse: turns the stripped text into the value; raises ``ValueError`` on a bad one.
        default_text: how the default reads in a listing, when it is computed.
        secret: a password: listings show whether it is set, never its value.
    """

    name: str
    type: str
    default: Any
    help: str
    parse: Callable[[str], Any]
    default_text: str = ""
    secret: bool = False

    def shown_default(self) -> str:
        """The default as a listing shows it."""
        return self.default_text or str(self.default)


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("TL_HOME", "path", None, "The workspace: runs.sqlite, runs/, datasets/, projects/ and (unless "
            "TL_CACHE_DIR) cache/.", _path, "~/.tl_studio"),
    Setting("TL_CACHE_DIR", "path", None, "The content-keyed caches (decoded images, features, checks, ONNX "
            "engines, the runs' verified ONNX exports), e.g. on a fast disk or shared by many workspaces.", _path, "<TL_HOME>/cache"),
    Setting("TL_CACHE_MAX_GB", "number > 0", 5.0, "Cap on the caches' size in GB; least recently used entries "
            "are evicted above it.", _positive_float),
    Setting("TL_MAX_WORKERS", "int >= 1", None, "Compute tasks (trainings included) that run at once on this "
            "machine; the others wait in the queue.", _positive_int, "one per 4 cores, at least 1"),
    Setting("TL_INTERACTIVE_WORKERS", "int >= 1", 1, "Interactive workers (Try it's predictions and heat-maps) "
            "that run at once.", _positive_int),
    Setting("TL_WARM_MODELS", "int >= 1", 2, "Models an interactive worker keeps loaded (least recently used "
            "dropped first).", _positive_int),
    Setting("TL_INTERACTIVE_IDLE_S", "seconds > 0", 600.0, "An interactive worker leaves after this many idle "
            "seconds.", _positive_float),
    Setting("TL_COMPUTE_IDLE_S", "seconds >= 0", 20.0, "A compute worker waits this many idle seconds for the "
            "next task before it leaves (0: at once), so that a task right after another starts without a new "
            "process importing torch.", _non_negative_float),
    Setting("TL_ZYGOTE", "auto|on|off", "auto", "New task workers are forked from a process that has imported "
            "torch and timm once (tl_core/storage/zygote.py: ~0.1 s instead of ~3 s per worker): auto on Linux, "
            "on, or off (a fresh interpreter per worker).", _auto_on_off),
    Setting("TL_ZYGOTE_IDLE_S", "seconds > 0", 600.0, "A worker zygote leaves after this many seconds without a "
            "new worker to start (it holds torch and timm in memory).", _positive_float),
    Setting("TL_TASK_KEEP_DAYS", "days >= 0", 7.0, "Finished tasks older than this are forgotten (their rows "
            "and result files).", _non_negative_float),
    Setting("TL_TRAIN_PROCS", "int >= 1 | all", None, "Processes a worker trains one run with (a torchrun group "
            "above 1); all: every GPU.", _train_procs, "every GPU on a machine with several, else 1"),
    Setting("TL_ENGINE", "auto|torch|onnx", "auto", "The frozen backbone's engine for feature extraction: auto "
            "picks ONNX Runtime on the CPU by a documented rule (docs/design.md).", _engine),
    Setting("TL_FOLD_BN", "auto|on|off", "auto", "PyTorch runs a copy of the frozen network with its batch norms "
            "folded into the convolutions (checked against the original on a test input; 1.3-1.4x as fast for "
            "EfficientNet-Lite0 on a CPU): auto for jobs of 32 images or more, on for every job, off never.",
            _auto_on_off),
    Setting("TL_ONNX_MIN_IMAGES", "int >= 0", 1850, "Under auto, jobs run on PyTorch while no ONNX file exists "
            "yet for their backbone, until the images they ran reach this many (the export's break-even: 1850 for "
            "the last layer, 3600 for several depths).", _non_negative_int),
    Setting("TL_ORT_WEB_DIR", "path", None, "Where the in-browser runtime (onnxruntime-web, fetched by `make "
            "web-runtime`) is, for the web-page export and Try it's Live view.", _path,
            "tl_core/share/web/vendor/onnxruntime-web-<version>"),
    Setting("TL_PASSWORD", "text", None, "The class password: with it set, the app shows nothing but a password "
            "form until it is given (docs/classroom.md, Access).", _text, "none (the app asks for nothing)",
            secret=True),
    Setting("TL_TEACHER_PASSWORD", "text", None, "The teacher password: it makes a session the teacher's, who may "
            "delete, rename and cancel in every project and sees the teacher's page.", _text,
            "none (without any password everyone may do everything)", secret=True),
    Setting("TL_QUEUE_PER_PROJECT", "int >= 1", 10, "Compute tasks (trainings included) one project (or the shared "
            "workspace) may have waiting, and as many uploads; one more is refused, so that no group fills the queue "
            "alone.", _positive_int),
    Setting("TL_DECODE_THREADS", "int >= 1", None, "Threads that decode and resize the next batch while the "
            "model runs; 1 turns it off.", _positive_int, "one per thread of TL_THREADS, at most 4"),
    Setting("TL_THREADS", "int >= 1", None, "Threads one process (a worker, a `tl-core` command) gives PyTorch "
            "and ONNX Runtime. On a server where several workers run at once (TL_MAX_WORKERS, the interactive "
            "lane), the cores divided by them keeps the workers from waiting for each other's threads.",
            _positive_int, "the cores the process may use"),
]}

_DEFAULTS: dict[str, Callable[[], Any]] = {
    "TL_HOME": lambda: Path.home() / ".tl_studio",
    "TL_MAX_WORKERS": lambda: max(1, (os.cpu_count() or 1) // 4),
    "TL_DECODE_THREADS": lambda: max(1, min(4, setting("TL_THREADS"))),
    "TL_THREADS": usable_cores,
}


def setting(name: str, default: Any = None) -> Any:
    """The value of the ``TL_*`` setting ``name``, parsed; its default when the variable is unset or empty.

    Args:
        name: a key of :data:`SETTINGS`.
        default: the value when unset, for settings whose default depends on the caller (``TL_CACHE_DIR``'s
            is the workspace's ``cache/``, ``TL_TRAIN_PROCS``' the GPU count); else the table's default.

    Returns:
        The parsed value (``int``, ``float``, ``str`` or ``Path`` as the setting's type says).

    Raises:
        ConfigError: the variable holds a value its type does not allow (the message names both).
        KeyError: ``name`` is not a setting (a programming error).
    """
    s = SETTINGS[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        if default is not None:
            return default
        if s.default is not None:
            return s.default
        compute = _DEFAULTS.get(name)
        return compute() if compute else None
    try:
        return s.parse(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"{name}={raw!r} is not valid: {name} takes {s.type}. "
                          f"Fix or unset it (`tl-core settings` lists every setting and what it takes).") from None


def validate_all() -> None:
    """Parse every setting once, so a typo is reported at start-up (by the CLI, the app) instead of later.

    Raises:
        ConfigError: the first setting whose value does not parse.
    """
    for name in SETTINGS:
        setting(name)


def describe() -> list[dict[str, Any]]:
    """Every setting as a row: name, type, default, help, value (the environment's text, or null when unset)
    and error (why that value is refused, or null).

    Returns:
        The rows in table order.
    """
    rows = []
    for s in SETTINGS.values():
        raw = os.environ.get(s.name, "").strip() or None
        error = None
        if s.secret:
            rows.append({"name": s.name, "type": s.type, "default": s.shown_default(), "help": s.help,
                         "value": "(set)" if raw else None, "error": None})
            continue
        if raw is not None:
            try:
                setting(s.name)
            except ConfigError as e:
                error = str(e)
        rows.append({"name": s.name, "type": s.type, "default": s.shown_default(), "help": s.help,
                     "value": raw, "error": error})
    return rows
