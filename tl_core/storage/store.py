"""The run store: one SQLite file per workspace (WAL mode), the single source of truth about runs and tasks.

Pages only read it; workers and the command line write it. A browser refresh, a second tab or a restarted
server therefore show the same runs and the same tasks. Safe for many processes: WAL mode, a busy timeout,
short transactions; connections are reused per process and thread.

Tables:

- ``runs``: one row per training run (config, status, progress, summary, the worker that runs it);
- ``epochs``: per-epoch metrics of a run (the live curves);
- ``tasks``: every long computation the app asks for, training included (``tl_core.runs.tasks``): kind,
  key (identical requests share one task), lane, parameters, status, progress, timings, error, the worker
  process (pid and start time), cancel flag.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..errors import RunError
from .processes import alive

__all__ = ["RunStore", "STATUSES", "ACTIVE_STATUSES", "FINAL_STATUSES", "new_id", "task_waited_s", "task_ran_s"]

STATUSES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
ACTIVE_STATUSES = ("queued", "running")
FINAL_STATUSES = ("done", "failed", "cancelled", "interrupted")

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
    owner TEXT,
    pid_start INTEGER,
    test_data TEXT
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    PRIMARY KEY (run_id, epoch)
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    lane TEXT NOT NULL,
    params TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    updated REAL NOT NULL,
    progress TEXT,
    error TEXT,
    pid INTEGER,
    pid_start INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    run_id TEXT
);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status, lane);
CREATE INDEX IF NOT EXISTS tasks_key ON tasks(key);
"""
#: Columns added after the first version, added to older stores when opened.
_ADDED_COLUMNS = {"runs": {"pid_start": "INTEGER", "test_data": "TEXT"}}

_SCHEMA_DONE: set[str] = set()
_CONNECTIONS: dict[tuple[str, int, int, int], sqlite3.Connection] = {}
_MAX_CONNECTIONS = 32


def new_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: sortable, unique, safe as a directory name."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def task_waited_s(row: Mapping[str, Any], now: float | None = None) -> float:
    """Seconds a task row waited from the click to a worker starting it (so far, when still queued).

    Args:
        row: a ``tasks`` row (``status``, ``created``, ``started``, ``finished``), e.g. :meth:`RunStore.task`.
        now: the time to count to while it waits (default: now).
    """
    end = row.get("started") or (row.get("finished") if row["status"] != "queued" else None)
    return (end or (time.time() if now is None else now)) - row["created"]


def task_ran_s(row: Mapping[str, Any], now: float | None = None) -> float:
    """Seconds a worker spent on a task row (so far, when still running; 0 before it starts).

    Args:
        row: a ``tasks`` row (``started``, ``finished``).
        now: the time to count to while it runs (default: now).
    """
    if row.get("started") is None:
        return 0.0
    return (row.get("finished") or (time.time() if now is None else now)) - row["started"]


def _json_cols(row: sqlite3.Row, cols: tuple[str, ...]) -> dict[str, Any]:
    d = dict(row)
    for k in cols:
        if d.get(k):
            d[k] = json.loads(d[k])
    d["cancel_requested"] = bool(d.get("cancel_requested"))
    return d


def _when_unlocked(step: Callable[[], Any], wait_s: float = 30.0) -> Any:
    """Run ``step``, again while SQLite answers "database is locked", for up to ``wait_s`` seconds.

    The connections wait out each other's locks (busy timeout 30 s), except where waiting could deadlock: processes
    that open a new database at once all read it, then each wants the exclusive lock that switching it to WAL (or
    creating the tables) takes, and SQLite fails one of them at once instead of waiting. Seen with 5 processes
    opening one new store under load (tests/test_faults.py); a class's sessions or a worker starting beside the
    server could meet it too. The step is idempotent (the WAL mode, the ``IF NOT EXISTS`` schema).
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return step()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02 + random.random() * 0.08)  # apart, so that the same two do not collide again


class RunStore:
    """SQLite store of runs and tasks."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        key = str(self.path.resolve())
        if key not in _SCHEMA_DONE or not self.path.exists():  # once per database and process
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _when_unlocked(self._create_schema)
            _SCHEMA_DONE.add(key)

    def _create_schema(self) -> None:
        with self._conn() as c:
            c.executescript(_SCHEMA)
            for table, cols in _ADDED_COLUMNS.items():
                have = {r["name"] for r in c.execute(f"PRAGMA table_info({table})")}
                for col, decl in cols.items():
                    if col not in have:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")

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
            _when_unlocked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
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


    def _update(self, table: str, row_id: str, fields: dict[str, Any]) -> None:
        if not fields:
            return
        cols, vals = [], []
        for k, v in fields.items():
            cols.append(f"{k}=?")
            vals.append(json.dumps(v) if isinstance(v, (dict, list)) else v)
        cols.append("updated=?")
        vals.append(time.time())
        with self._conn() as c:
            c.execute(f"UPDATE {table} SET {', '.join(cols)} WHERE id=?", (*vals, row_id))

    # ==============================================================================================
    # runs
    # ==============================================================================================
    def create_run(self, data: str, config: dict[str, Any], status: str = "queued", name: str | None = None,
                   owner: str | None = None) -> str:
        """Insert a new run and return its id (``YYYYmmdd-HHMMSS-xxxxxx``: sortable and unique)."""
        run_id = new_id()
        now = time.time()
        with self._conn() as c:
            c.execute(
                "INSERT INTO runs (id, created, updated, status, name, data, config, owner) VALUES (?,?,?,?,?,?,?,?)",
                (run_id, now, now, status, name, str(data), json.dumps(config), owner),
            )
        return run_id

    def update(self, run_id: str, **fields: Any) -> None:
        """Set columns of a run (JSON-encodes dicts/lists); ``updated`` is refreshed."""
        self._update("runs", run_id, fields)

    def set_status(self, run_id: str, status: str, error: str | None = None) -> None:
        assert status in STATUSES, status
        self.update(run_id, status=status, error=error)

    def add_epoch(self, run_id: str, epoch: int, metrics: dict[str, Any]) -> None:
        with self._conn() as c:
            c.execute("INSERT OR REPLACE INTO epochs (run_id, epoch, metrics) VALUES (?,?,?)",
                      (run_id, epoch, json.dumps(metrics)))
            c.execute("UPDATE runs SET updated=? WHERE id=?", (time.time(), run_id))

    def add_epochs(self, run_id: str, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """:meth:`add_epoch` for several epochs (``(epoch, metrics)`` each) in one transaction: a linear probe
        reports a few hundred solver rounds a second."""
        if not rows:
            return
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany("INSERT OR REPLACE INTO epochs (run_id, epoch, metrics) VALUES (?,?,?)",
                              [(run_id, int(e), json.dumps(m)) for e, m in rows])
                c.execute("UPDATE runs SET updated=? WHERE id=?", (time.time(), run_id))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def request_cancel(self, run_id: str) -> None:
        """Ask the worker to stop at its next check point (queued runs are cancelled at once)."""
        with self._conn() as c:
            c.execute("UPDATE runs SET cancel_requested=1, updated=? WHERE id=?", (time.time(), run_id))
            c.execute("UPDATE runs SET status='cancelled', error='Cancelled before it started.' "
                      "WHERE id=? AND status='queued'", (run_id,))

    def delete(self, run_id: str, runs_dir: Path | None = None) -> None:
        with self._conn() as c:
            c.execute("DELETE FROM epochs WHERE run_id=?", (run_id,))
            c.execute("DELETE FROM runs WHERE id=?", (run_id,))
        if runs_dir is not None:
            shutil.rmtree(runs_dir / run_id, ignore_errors=True)

    def get(self, run_id: str) -> dict[str, Any]:
        with self._conn() as c:
            row = c.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            raise RunError(f"No run with id {run_id!r}; `tl-core runs` lists them.")
        return _json_cols(row, ("config", "weights", "summary", "progress"))

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
            return [_json_cols(r, ("config", "weights", "summary", "progress")) for r in c.execute(q, args).fetchall()]

    def epochs(self, run_id: str) -> list[dict[str, Any]]:
        with self._conn() as c:
            rows = c.execute("SELECT epoch, metrics FROM epochs WHERE run_id=? ORDER BY epoch", (run_id,)).fetchall()
        return [{"epoch": r["epoch"], **json.loads(r["metrics"])} for r in rows]

    def mark_dead_workers(self, reason: str = "interrupted") -> list[str]:
        """Runs marked running whose process is gone (pid and start time) become ``interrupted``."""
        dead = []
        for run in self.list(status="running"):
            if not alive(run.get("pid"), run.get("pid_start")):
                dead.append(run["id"])
                msg = ("The training process stopped unexpectedly (killed, out of memory, or the server restarted); "
                       "start the run again.")
                with self._conn() as c:  # only if still running: the worker may have finished meanwhile
                    c.execute("UPDATE runs SET status=?, error=?, updated=? WHERE id=? AND status='running'",
                              (reason, msg, time.time(), run["id"]))
        return dead

    # ==============================================================================================
    # tasks
    # ==============================================================================================
    def create_task(self, kind: str, key: str, lane: str, params: dict[str, Any], owner: str | None = None,
                    run_id: str | None = None, share: bool = True) -> tuple[str, bool]:
        """Insert a queued task, or find the one already made for ``key``.

        With ``share``, a task with the same key that is queued, running or done is returned instead of a
        new one (identical requests share one task; a done one is a cached result).

        Returns:
            (task id, True when an existing task was returned)
        """
        with self._conn() as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                if share:
                    row = c.execute("SELECT id FROM tasks WHERE key=? AND status IN ('queued','running','done') "
                                    "ORDER BY created DESC LIMIT 1", (key,)).fetchone()
                    if row is not None:
                        c.execute("COMMIT")
                        return row["id"], True
                task_id = new_id()
                now = time.time()
                c.execute("INSERT INTO tasks (id, kind, key, lane, params, status, created, updated, owner, run_id) "
                          "VALUES (?,?,?,?,?,'queued',?,?,?,?)",
                          (task_id, kind, key, lane, json.dumps(params), now, now, owner, run_id))
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        return task_id, False

    def update_task(self, task_id: str, **fields: Any) -> None:
        self._update("tasks", task_id, fields)

    def finish_task(self, task_id: str, status: str, error: str | None = None) -> None:
        """Record how a task ended (only a task still running or queued changes: a cancel wins)."""
        assert status in FINAL_STATUSES, status
        now = time.time()
        with self._conn() as c:
            # the pid stays: which worker ran a task is worth knowing afterwards
            c.execute("UPDATE tasks SET status=?, error=?, finished=?, updated=? "
                      "WHERE id=? AND status IN ('queued','running')", (status, error, now, now, task_id))

    def task(self, task_id: str) -> dict[str, Any]:
        with self._conn() as c:
            row = c.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        if row is None:
            raise RunError(f"No task with id {task_id!r}.")
        return _json_cols(row, ("params", "progress"))

    def find_task(self, key: str) -> dict[str, Any] | None:
        """The newest task made for ``key`` (any status), or None."""
        with self._conn() as c:
            row = c.execute("SELECT * FROM tasks WHERE key=? ORDER BY created DESC LIMIT 1", (key,)).fetchone()
        return None if row is None else _json_cols(row, ("params", "progress"))

    def tasks(self, status: str | None = None, lane: str | None = None, kind: str | None = None
              ) -> list[dict[str, Any]]:
        """Tasks, oldest first, optionally of one status, lane or kind."""
        conds, args = [], []
        for col, val in (("status", status), ("lane", lane), ("kind", kind)):
            if val is not None:
                conds.append(f"{col}=?")
                args.append(val)
        q = "SELECT * FROM tasks" + (" WHERE " + " AND ".join(conds) if conds else "") + " ORDER BY created, id"
        with self._conn() as c:
            return [_json_cols(r, ("params", "progress")) for r in c.execute(q, args).fetchall()]

    def oldest_queued(self, lane: str) -> tuple[float, str] | None:
        """(created, id) of the oldest queued task of ``lane``."""
        with self._conn() as c:
            row = c.execute("SELECT created, id FROM tasks WHERE status='queued' AND lane=? ORDER BY created, id "
                            "LIMIT 1", (lane,)).fetchone()
        return None if row is None else (row["created"], row["id"])

    def last_started(self, lane: str) -> float:
        """When a task of ``lane`` last started in this workspace (0.0: never): whose turn it is in the queue."""
        with self._conn() as c:
            row = c.execute("SELECT MAX(started) FROM tasks WHERE lane=? AND started IS NOT NULL", (lane,)).fetchone()
        return float(row[0] or 0.0)

    def claim_task(self, task_id: str, pid: int, pid_start: int | None) -> bool:
        """Move a queued task to running for worker (pid, start); False when another worker was faster."""
        now = time.time()
        with self._conn() as c:
            cur = c.execute("UPDATE tasks SET status='running', pid=?, pid_start=?, started=?, updated=? "
                            "WHERE id=? AND status='queued'", (pid, pid_start, now, now, task_id))
            return cur.rowcount == 1

    def request_task_cancel(self, task_id: str) -> str:
        """Flag a task for cancelling; a queued one is cancelled at once. Returns its status afterwards."""
        now = time.time()
        with self._conn() as c:
            c.execute("UPDATE tasks SET cancel_requested=1, updated=? WHERE id=?", (now, task_id))
            c.execute("UPDATE tasks SET status='cancelled', error='Cancelled before it started.', finished=? "
                      "WHERE id=? AND status='queued'", (now, task_id))
            row = c.execute("SELECT status FROM tasks WHERE id=?", (task_id,)).fetchone()
        return row["status"] if row else "cancelled"

    def task_cancel_requested(self, task_id: str) -> bool:
        with self._conn() as c:
            row = c.execute("SELECT cancel_requested FROM tasks WHERE id=?", (task_id,)).fetchone()
        return bool(row and row[0])

    def mark_dead_tasks(self) -> list[dict[str, Any]]:
        """Running tasks whose worker is gone (pid and start time) become ``interrupted``; returns them."""
        dead = []
        for t in self.tasks(status="running"):
            if not alive(t.get("pid"), t.get("pid_start")):
                now = time.time()
                with self._conn() as c:
                    cur = c.execute("UPDATE tasks SET status='interrupted', error=?, finished=?, updated=? "
                                    "WHERE id=? AND status='running'",
                                    ("The worker stopped unexpectedly (killed, out of memory, or the machine "
                                     "restarted); start it again.", now, now, t["id"]))
                if cur.rowcount:
                    dead.append(t)
        return dead

    def delete_task(self, task_id: str) -> None:
        with self._conn() as c:
            c.execute("DELETE FROM tasks WHERE id=?", (task_id,))
