"""Functions the task-queue tests run in other processes (multiprocessing needs them importable)."""

from __future__ import annotations

import os


def claim_tasks_until_empty(db_path: str) -> list[str]:
    """Claim queued tasks of the compute lane (as a worker does) until none is left; returns the ids got."""
    from tl_core.storage.processes import identity
    from tl_core.storage.store import RunStore

    store = RunStore(db_path)
    pid, started = identity()
    got = []
    while (oldest := store.oldest_queued("compute")) is not None:
        if store.claim_task(oldest[1], pid, started):
            got.append(oldest[1])
            store.finish_task(oldest[1], "done")
    return got


def submit_and_vanish(home: str, data: str, signature: str) -> str:
    """A 'server' that submits an audit task and dies at once (the task must live on in its worker)."""
    from tl_core.runs import tasks
    from tl_core.storage.workspace import Workspace

    t = tasks.submit(Workspace(home), "audit", audit_params(data, signature))
    os._exit(0) if os.environ.get("TL_TEST_HARD_EXIT") else None
    return t.id


def audit_params(data: str, signature: str) -> dict:
    return {"data": data, "signature": signature, "backbone": "efficientnet_lite0", "val_split": 0.2, "seed": 0,
            "max_per_class": 200}
