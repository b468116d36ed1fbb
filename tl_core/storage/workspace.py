"""The workspace: where TL Studio keeps everything it writes (``$TL_HOME``, default ``~/.tl_studio``).

::

    runs.sqlite        the run store: runs, per-epoch metrics, tasks (storage/store.py)
    runs/<id>/         a run's files (storage/files.py)
    tasks/<id>/        a finished task's result
    datasets/          unpacked uploads
    uploads/incoming/  uploaded zips waiting for their intake task (tl_core.runs.datasets)
    weights/           uploaded weights files
    cache/             content-keyed caches shared by every project (tl_core/cache.py); $TL_CACHE_DIR moves it
    workers/           worker slot locks and logs shared by every project
    projects/<slug>/   a project: a workspace of its own (runs, tasks, uploads), same caches and workers
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunError
from ..settings import setting
from .store import RunStore

__all__ = ["Workspace", "default_home", "new_project_slug", "TASK_RESULT"]

#: A finished task's result in its folder (``tasks/<id>/``).
TASK_RESULT = "result.json"


def default_home() -> Path:
    """``$TL_HOME`` or ``~/.tl_studio``."""
    return setting("TL_HOME")


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

    @classmethod
    def at(cls, home: str | os.PathLike) -> "Workspace":
        """The workspace whose folder is ``home``: a project when it lies in ``<TL_HOME>/projects/``."""
        home = Path(home).expanduser().resolve()
        if home.parent.name == "projects" and _PROJECT_SLUG.match(home.name) and (home / "runs.sqlite").exists():
            return cls(home, root=home.parent.parent)
        return cls(home)

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
        """The shared caches: ``$TL_CACHE_DIR`` when set (a fast disk, or one cache for many workspaces), else
        ``<TL_HOME>/cache``."""
        return setting("TL_CACHE_DIR", self.top / "cache")

    @property
    def tasks_dir(self) -> Path:
        return self.home / "tasks"

    def task_dir(self, task_id: str) -> Path:
        """The folder of task ``task_id``'s files: its result (:data:`TASK_RESULT`) and the files it names."""
        if not task_id or "/" in task_id or task_id.startswith("."):
            raise RunError(f"{task_id!r} is not a valid task id.")
        return self.tasks_dir / task_id

    @property
    def workers_dir(self) -> Path:
        """Worker slot locks and logs: one set per machine (shared by every project)."""
        return self.top / "workers"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def incoming_dir(self) -> Path:
        """Uploaded dataset zips the server received, waiting for the worker task that unpacks and checks them."""
        return self.home / "uploads" / "incoming"

    def run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunError(f"{run_id!r} is not a valid run id.")
        return self.runs_dir / run_id

    def store(self) -> RunStore:
        return RunStore(self.db_path)
