"""How the classroom names a project: its slug, or :data:`SHARED` for the shared workspace (no project).

Both the teacher's view (``overview``) and the class challenge (``challenge``) label projects this way; it lives
here so that neither imports the other for it.
"""

from __future__ import annotations

from ..storage.workspace import Workspace

__all__ = ["SHARED", "label", "project_of"]

#: How the shared workspace (no project) is named in the teacher's tables, the export and the leaderboard.
SHARED = "(shared workspace)"


def label(ws: Workspace) -> str:
    """The project's slug, or :data:`SHARED` for the shared workspace."""
    return ws.name or SHARED


def project_of(top: Workspace, project: str | None) -> Workspace:
    """The workspace of ``project`` (a slug, or None / :data:`SHARED` for the shared workspace).

    Raises:
        RunError: no such project.
    """
    top = Workspace(top.top)
    return top if project in (None, "", SHARED) else top.project(project)
