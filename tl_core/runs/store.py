"""The workspace layout and the SQLite run store (WAL mode), the single source of truth about runs.

Workspace (``$TL_HOME``, default ``~/.tl_studio``)::

    runs.sqlite        run rows, per-epoch metrics, progress, cancel flags
    runs/<id>/         config.json, model.safetensors, meta.json, metrics.json, predictions.json
    cache/decoded/     decoded images (uint8)          cache/features/  embeddings
    datasets/          unpacked uploads
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import RunError

__all__ = ["Workspace", "RunStore", "default_home", "new_project_slug", "STATUSES", "ACTIVE_STATUSES"]

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
ACTIVE_STATUSES = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    name TEXT,
    data TEXT NOT NULL,
    config TEXT NOT NULL,
    dataset_fingerprint TEXT,
    weights TEXT,
    summary TEXT,
    progress TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    owner TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""


_SCHEMA_DONE: set[str] = set()
_CONNECTIONS: dict[tuple[str, int, int, int], sqlite3.Connection] = {}
_MAX_CONNECTIONS = 32


def default_home() -> Path:
    """``$TL_HOME`` or ``~/.tl_studio``."""
    return Path(os.environ.get("TL_HOME") or Path.home() / ".tl_studio").expanduser()


_PROJECT_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{2,62}[a-z0-9]$")


def new_project_slug(name: str) -> str:
    """A project id from a display name plus 8 random characters: the link is the key to the project."""
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "project"
    return f"{base}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace. Everything TL Studio writes lives under ``home``.

    A named project is a workspace of its own under ``<TL_HOME>/projects/<slug>/`` (its runs, uploads and
    weights are invisible to other projects); the content-keyed caches and the worker slots stay shared at
    the top (``root``), so identical images are never processed twice and the machine-wide training limit
    holds across projects.
    """

    home: Path
    root: Path | None = None

    @classmethod
    def default(cls) -> "Workspace":
        return cls(default_home())

    def __post_init__(self) -> None:
        object.__setattr__(self, "home", Path(self.home).expanduser().resolve())
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root).expanduser().resolve())
        for d in (self.home, self.runs_dir, self.cache_dir, self.datasets_dir):
            d.mkdir(parents=True, exist_ok=True)

    @property
    def top(self) -> Path:
        """The TL_HOME that holds this workspace (itself, unless it is a project)."""
        return self.root or self.home

    @property
    def is_project(self) -> bool:
        return self.root is not None

    @property
    def name(self) -> str | None:
        return self.home.name if self.root is not None else None

    def project(self, slug: str, create: bool = False) -> "Workspace":
        """The project workspace ``slug`` (see :func:`new_project_slug`).

        Raises:
            RunError: the slug is malformed, or the project does not exist and ``create`` is False.
        """
        if not _PROJECT_SLUG.match(slug or ""):
            raise RunError(f"{slug!r} is not a valid project id (lower-case letters, digits and dashes).")
        home = self.top / "projects" / slug
        if not create and not (home / "runs.sqlite").exists():
            raise RunError(f"No project {slug!r}; check the link, or start a new project.")
        ws = Workspace(home, root=self.top)
        ws.store()  # creates runs.sqlite: the project now exists
        return ws

    def all_workspaces(self) -> list["Workspace"]:
        """The top workspace and every project under it (workers serve them all)."""
        top = Workspace(self.top) if self.root is not None else self
        out = [top]
        pdir = self.top / "projects"
        if pdir.is_dir():
            out += [Workspace(p, root=self.top) for p in sorted(pdir.iterdir())
                    if p.is_dir() and _PROJECT_SLUG.match(p.name) and (p / "runs.sqlite").exists()]
        return out

    @property
    def db_path(self) -> Path:
        return self.home / "runs.sqlite"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def cache_dir(self) -> Path:
        return self.top / "cache"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunError(f"{run_id!r} is not a valid run id.")
        return self.runs_dir / run_id

    def store(self) -> "RunStore":
        return RunStore(self.db_path)

    # -- cache maintenance -------------------------------------------------------------------------
    def cache_usage(self) -> dict[str, int]:
        """Bytes used by each cache (decoded images, features) under ``cache/``."""
        usage = {}
        for sub in ("decoded", "features"):
            d = self.cache_dir / sub
            usage[sub] = sum(f.stat().st_size for f in d.rglob("*.npy")) if d.exists() else 0
        return usage

    def enforce_cache_limit(self, max_bytes: int | None = None) -> int:
        """Evict least-recently-used cache entries (decoded images and features together) above the cap.

        The cap is ``max_bytes``, else ``$TL_CACHE_MAX_GB`` (default 5 GB). Returns bytes freed.
        """
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("TL_CACHE_MAX_GB", "5")) * 1024**3)
        files = []
        for sub in ("decoded", "features"):
            d = self.cache_dir / sub
            if d.exists():
                for f in d.rglob("*.npy"):
                    try:
                        st = f.stat()
                    except OSError:
                        continue
                    files.append((st.st_mtime, st.st_size, f))
        total = sum(s for _, s, _ in files)
        freed = 0
        for _, size, f in sorted(files):  # oldest use first (a cache hit touches the file)
            if total - freed <= max_bytes:
                break
            f.unlink(missing_ok=True)
            freed += size
        return freed

    def clear_cache(self) -> int:
        """Delete every cached decoded image and feature (runs are kept). Returns bytes freed."""
        freed = sum(self.cache_usage().values())
        for sub in ("decoded", "features"):
            shutil.rmtree(self.cache_dir / sub, ignore_errors=True)
        (self.cache_dir / "checked.sqlite").unlink(missing_ok=True)
        return freed


class RunStore:
    """SQLite store of runs. Safe for many processes: WAL mode, busy timeout, short transactions."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        key = str(self.path.resolve())
        if key not in _SCHEMA_DONE or not self.path.exists():  # once per database and process
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._conn() as c:
                c.executescript(_SCHEMA)
            _SCHEMA_DONE.add(key)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        """A connection reused per (database, process, thread): opening one costs more than a small write."""
        try:
            inode = self.path.stat().st_ino  # a database deleted and made again is a new one
        except OSError:
            inode = 0
        key = (str(self.path), os.getpid(), threading.get_ident(), inode)
        conn = _CONNECTIONS.pop(key, None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise
        finally:
            _CONNECTIONS[key] = conn  # most recently used last
            while len(_CONNECTIONS) > _MAX_CONNECTIONS:
                old_key = next(iter(_CONNECTIONS))
                old = _CONNECTIONS.pop(old_key)
                if old_key[1] == os.getpid():  # never touch a connection inherited through fork
                    old.close()

    # -- writes ------------------------------------------------------------------------------------
    def create_run(self, data: str, config: dict[str, Any], status: str = "queued", name: str | None = None,
                   owner: str | None = None) -> str:
        """Insert a new run and return its id (``YYYYmmdd-HHMMSS-xxxxxx``: sortable and unique)."""
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT INTO runs (id, created, updated, status, name, data, config, owner) VALUES (?,?,?,?,?,?,?,?)",
                (run_id, now, now, status, name, str(data), json.dumps(config), owner),
            )
        return run_id

    def update(self, run_id: str, **fields: Any) -> None:
        """Set columns of a run (JSON-encodes dicts/lists); ``updated`` is refreshed."""
        if not fields:
            return
        cols, vals = [], []
        for k, v in fields.items():
            cols.append(f"{k}=?")
            vals.append(json.dumps(v) if isinstance(v, (dict, list)) else v)
        cols.append("updated=?")
        vals.append(time.time())
        with self._conn() as c:
            c.execute(f"UPDATE runs SET {', '.join(cols)} WHERE id=?", (*vals, run_id))

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        assert status in STATUSES, status
        self.update(run_id, status=status, error=error)

    def add_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        with self._conn() as c:
            c.execute("INSERT OR REPLACE INTO epochs (run_id, epoch, metrics) VALUES (?,?,?)",
                      (run_id, epoch, json.dumps(metrics)))
            c.execute("UPDATE runs SET updated=? WHERE id=?", (time.time(), run_id))

    def request_cancel(self, run_id: str) -> None:
        """Ask the worker to stop at its next check point (queued runs are cancelled at once)."""
        with self._conn() as c:
            c.execute("UPDATE runs SET cancel_requested=1, updated=? WHERE id=?", (time.time(), run_id))
            c.execute("UPDATE runs SET status='cancelled', error='Cancelled before it started.' "
                      "WHERE id=? AND status='queued'", (run_id,))

    def claim_next(self, pid: int) -> str | None:
        """Atomically move the oldest queued run to running for worker ``pid``; None when none is queued."""
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            row = c.execute("SELECT id FROM runs WHERE status='queued' ORDER BY created, id LIMIT 1").fetchone()
            if row is None:
                c.execute("COMMIT")
                return None
            c.execute("UPDATE runs SET status='running', pid=?, updated=? WHERE id=?", (pid, time.time(), row["id"]))
            c.execute("COMMIT")
            return row["id"]

    def delete(self, run_id: str, runs_dir: Path | None = None) -> None:
        with self._conn() as c:
            c.execute("DELETE FROM epochs WHERE run_id=?", (run_id,))
            c.execute("DELETE FROM runs WHERE id=?", (run_id,))
        if runs_dir is not None:
            shutil.rmtree(runs_dir / run_id, ignore_errors=True)

    # -- reads -------------------------------------------------------------------------------------
    @staticmethod
    def _row(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        for k in ("config", "weights", "summary", "progress"):
            if d.get(k):
                d[k] = json.loads(d[k])
        d["cancel_requested"] = bool(d.get("cancel_requested"))
        return d

    def get(self, run_id: str) -> dict[str, Any]:
        with self._conn() as c:
            row = c.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise RunError(f"No run with id {run_id!r}; `tl-core runs` lists them.")
        return self._row(row)

    def exists(self, run_id: str) -> bool:
        with self._conn() as c:
            return c.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone() is not None

    def cancel_requested(self, run_id: str) -> bool:
        with self._conn() as c:
            row = c.execute("SELECT cancel_requested FROM runs WHERE id=?", (run_id,)).fetchone()
        return bool(row and row[0])

    def list(self, status: str | None = None, owner: str | None = None) -> list[dict[str, Any]]:
        q, args = "SELECT * FROM runs", []
        conds = []
        if status:
            conds.append("status=?")
            args.append(status)
        if owner is not None:
            conds.append("owner=?")
            args.append(owner)
        if conds:
            q += " WHERE " + " AND ".join(conds)
        q += " ORDER BY created DESC, id DESC"
        with self._conn() as c:
            return [self._row(r) for r in c.execute(q, args).fetchall()]

    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        with self._conn() as c:
            rows = c.execute("SELECT epoch, metrics FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)).fetchall()
        return [{"epoch": r["epoch"], **json.loads(r["metrics"])} for r in rows]

    def mark_dead_workers(self, reason: str = "interrupted") -> list[str]:
        """Runs marked running whose worker process is gone become ``interrupted`` (or failed)."""
        dead = []
        for run in self.list(status="running"):
            pid = run.get("pid")
            if not pid or not _pid_alive(int(pid)):
                dead.append(run["id"])
                msg = ("The training process stopped unexpectedly (killed, out of memory, or the server restarted); "
                       "start the run again.")
                self.update(run["id"], status=reason, error=msg)
        return dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child counts as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True
