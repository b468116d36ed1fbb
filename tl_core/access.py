"""Who may do what on a shared server: the class and teacher passwords, slowing down wrong guesses, the class
code of a project, and the ownership rules the engine enforces.

Without passwords (``TL_PASSWORD`` and ``TL_TEACHER_PASSWORD`` unset) nothing is checked: everyone is the
teacher, as before. With them:

- the class password lets a student in; the teacher password makes the session the teacher's;
- a student may delete, rename or cancel only inside their own project (the project their session works in),
  plus, anywhere, the runs and tasks their own session queued; never the shared workspace's datasets, nor
  another project's things. The teacher may do all of it.

The engine functions that delete, rename or cancel (:func:`tl_core.runs.datasets.delete_dataset`,
:func:`~tl_core.runs.datasets.rename_dataset`, :func:`tl_core.runs.tasks.cancel_run`,
:func:`~tl_core.runs.tasks.delete_run`, :func:`~tl_core.runs.tasks.cancel`) take an ``actor`` and call
:func:`require`; a refusal is an :class:`AccessError` in one sentence. ``actor=None`` (the command line, the
engine itself) checks nothing: whoever runs commands on the server owns it.

This module never imports streamlit: the app's gate (``pages/_access.py``) builds the :class:`Actor` and keeps
the :class:`Throttle` in a place that outlives its reruns.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import TLError
from .settings import setting

if TYPE_CHECKING:
    from .storage.workspace import Workspace

__all__ = ["AccessError", "Actor", "TEACHER", "STUDENT", "passwords", "check_password", "Throttle",
           "may_modify", "require", "class_code", "project_for_code", "remember_token", "role_for_token"]

TEACHER = "teacher"
STUDENT = "student"
#: Characters of a project's class code.
CODE_LENGTH = 6


class AccessError(TLError):
    """The user may not do this (another project's or the shared workspace's things, or a wrong password)."""


@dataclass(frozen=True)
class Actor:
    """Who asks.

    Attributes:
        role: ``"teacher"`` or ``"student"``.
        project: the slug of the project the student's session works in (None: the shared workspace).
        session: the id the session's runs and tasks are queued under (their ``owner``).
    """

    role: str
    project: str | None = None
    session: str | None = None

    @property
    def is_teacher(self) -> bool:
        return self.role == TEACHER


def passwords(class_password: str | None = None, teacher_password: str | None = None) -> tuple[str, str]:
    """The class and teacher passwords: the ``TL_PASSWORD`` and ``TL_TEACHER_PASSWORD`` settings, else the given
    fallbacks (the app passes those of ``[tl]`` in its secrets or ``.streamlit/config.toml``).

    Returns:
        (class password, teacher password); "" where none is set.
    """
    return ((setting("TL_PASSWORD") or class_password or "").strip(),
            (setting("TL_TEACHER_PASSWORD") or teacher_password or "").strip())


def check_password(given: str | None, expected: str) -> bool:
    """True when ``given`` is ``expected``, compared in constant time (no timing tells how much matched).

    An empty ``expected`` (no password set) never matches: a password that is not set cannot be given.
    """
    if not expected:
        return False
    return hmac.compare_digest((given or "").strip().encode("utf-8"), expected.encode("utf-8"))


def remember_token(role: str, password: str) -> str:
    """What a browser keeps (a cookie) so that a refresh or a new tab does not ask for the password again:
    the role and an HMAC of it keyed by that role's password. Changing the password makes old ones worthless;
    the token opens the app only as far as the password does.
    """
    mac = hmac.new(password.encode("utf-8"), f"tl-studio-access:{role}".encode(), hashlib.sha256).hexdigest()
    return f"{role}.{mac[:40]}"


def role_for_token(token: str | None, class_password: str, teacher_password: str) -> str | None:
    """The role a remembered token (:func:`remember_token`) grants, checked in constant time; None when it
    grants none (no token, a changed password, a forged one)."""
    if not token:
        return None
    for role, password in ((TEACHER, teacher_password), (STUDENT, class_password)):
        if password and hmac.compare_digest(token.encode("utf-8"), remember_token(role, password).encode("utf-8")):
            return role
    return None


@dataclass
class Throttle:
    """Slows down repeated wrong guesses from one client: after ``free`` wrong guesses, each further one locks the
    client out for a delay that doubles (``base_s``, 2×, 4×, ... up to ``max_s``). A right guess clears it.

    Keep one per client in a place that outlives a page's rerun (the app keeps them in a server-wide
    dictionary keyed by the client's address, so that opening a new tab does not start afresh).
    """

    free: int = 3
    base_s: float = 1.0
    max_s: float = 60.0
    failures: int = 0
    locked_until: float = 0.0
    clock: object = field(default=time.monotonic, repr=False)

    def wait_s(self) -> float:
        """Seconds until the next guess is accepted (0: now)."""
        return max(0.0, self.locked_until - self.clock())

    def failed(self) -> float:
        """Record a wrong guess; returns the seconds the client now has to wait."""
        self.failures += 1
        extra = self.failures - self.free
        if extra > 0:
            self.locked_until = self.clock() + min(self.max_s, self.base_s * 2 ** (extra - 1))
        return self.wait_s()

    def succeeded(self) -> None:
        self.failures = 0
        self.locked_until = 0.0

    def refusal(self) -> str | None:
        """The sentence to show while locked out, or None when a guess may be made."""
        wait = self.wait_s()
        if wait <= 0:
            return None
        return f"Too many wrong guesses: wait {wait:.0f} s, then try again."


def may_modify(actor: Actor | None, ws: "Workspace", owner: str | None = None) -> bool:
    """Whether ``actor`` may delete, rename or cancel something of workspace ``ws``.

    Args:
        actor: who asks (None: no access control, e.g. the command line).
        ws: the workspace (project or shared) the thing belongs to.
        owner: the session that queued it (a run's or task's ``owner``); None for datasets.
    Returns:
        True for the teacher and for no actor; for a student, True inside their own project, or for a run or
        task their own session queued.
    """
    if actor is None or actor.is_teacher:
        return True
    if ws.is_project and actor.project and ws.name == actor.project:
        return True
    return owner is not None and actor.session is not None and owner == actor.session


def require(actor: Actor | None, ws: "Workspace", what: str, owner: str | None = None) -> None:
    """Refuse with an :class:`AccessError` unless :func:`may_modify`.

    Args:
        what: the action in words, e.g. ``"delete the dataset 'cats'"``.
    Raises:
        AccessError: one sentence saying whose it is and who may.
    """
    if may_modify(actor, ws, owner):
        return
    whose = f"project '{ws.name}'" if ws.is_project else "the shared workspace"
    raise AccessError(f"You cannot {what}: it belongs to {whose}, not to your project; only the teacher can.")


def class_code(slug: str) -> str:
    """The short code a group joins its project with: the last :data:`CODE_LENGTH` characters of the project's
    id (its random part, so it cannot be guessed from the name), upper case."""
    return slug[-CODE_LENGTH:].upper()


def project_for_code(ws: "Workspace", code: str) -> str:
    """The project whose class code is ``code`` (case and spaces ignored).

    Raises:
        AccessError: no project, or more than one, has that code.
    """
    code = "".join((code or "").split()).upper()
    if len(code) != CODE_LENGTH:
        raise AccessError(f"A class code has {CODE_LENGTH} characters; check it with your group.")
    found = [w.name for w in ws.all_workspaces() if w.is_project and class_code(w.name) == code]
    if not found:
        raise AccessError(f"No project has the class code {code}; check it with your group.")
    if len(found) > 1:
        raise AccessError(f"Several projects share the class code {code}; open your project by its link instead.")
    return found[0]
