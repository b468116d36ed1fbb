"""Scale-out: devices, and training with PyTorch DDP under torchrun (2 processes, gloo, on the CPU).

Real runs on real images: a 2-process fine-tune finishes with ``world_size`` 2 and one JSON document on
stdout, within a stated tolerance of the 1-process run; a 2-process linear probe (features sharded across
the ranks and gathered) gives exactly the 1-process probe; cancel stops every rank; a killed rank fails the
run with the reason and leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EMOJI, wait_for
from tl_core.config import TrainConfig
from tl_core.errors import ConfigError
from tl_core.models.devices import Runtime, check_device_name, describe_auto_device, resolve_device
from tl_core.models.training import BalancedSampler
from tl_core.runs import tasks
from tl_core.storage.files import RunFiles
from tl_core.runs.launch import failure_reason
from tl_core.storage.processes import alive

#: 2-process and 1-process fine-tunes differ in the order each rank sees the images (as any two seeds do);
#: on 25 validation images they may differ by this much accuracy (4 images).
DDP_TOLERANCE = 0.16
FULL = ["--strategy", "full", "--epochs", "1", "--batch-size", "8", "--augment", "none"]


def _data(root: Path, per_class: int = 25) -> Path:
    for c in ("animal", "face", "food", "flag", "vehicle"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((EMOJI / c).iterdir())[:per_class]:
            shutil.copy(f, root / c / f.name)
    return root


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    return _data(tmp_path_factory.mktemp("ddp") / "data")


def _cli(home: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TL_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "tl_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _train_here(capsys, home: Path, *args: str) -> dict:
    """The 1-process baseline: ``tl-core train *args --json`` in this process (a subprocess of its own would
    prove nothing more: the 2-process group beside it is the real-process test), its JSON document returned."""
    from tl_core.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TL_HOME", str(home))
        capsys.readouterr()
        code = main(["train", *args, "--json", "--quiet"])
        out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    return json.loads(out.out)  # stdout is exactly one JSON document


def _torchelastic_dirs() -> set[str]:
    """The folders torchrun makes in the temporary folder when it is given no ``--log-dir``."""
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("torchelastic_*")}


def _group_processes(home: Path) -> list[int]:
    """Processes (other than this one) whose environment names ``home`` as TL_HOME: the group's ranks."""
    out = []
    want = f"TL_HOME={home}".encode()
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if want in (p / "environ").read_bytes().split(b"\0") and alive(int(p.name)):
                    out.append(int(p.name))
            except OSError:
                continue
    return out


def _rank_pid(home: Path, rank: int) -> int | None:
    want_home, want_rank = f"TL_HOME={home}".encode(), f"RANK={rank}".encode()
    for pid in _group_processes(home):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want_home in env and want_rank in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


# ==================================================================================================
# devices (no GPU here: the CPU path, and clear errors for a device that is not there)
# ==================================================================================================
def test_tl_threads_sizes_torchs_pool_shared_out_among_a_groups_processes(monkeypatch):
    """TL_THREADS is what a process gives PyTorch (and ONNX Runtime), divided among the processes of a group on one
    machine; unset, it is the cores the process may use; a bad value is a clear error."""
    import torch

    from tl_core.models.devices import configure_threads, cpu_count, thread_count

    saved = torch.get_num_threads()
    try:
        monkeypatch.setenv("TL_THREADS", "4")
        assert thread_count() == 4 and configure_threads() == 4 == torch.get_num_threads()
        assert configure_threads(processes_per_machine=2) == 2 == torch.get_num_threads()
        assert configure_threads(processes_per_machine=8) == 1  # never none
        monkeypatch.delenv("TL_THREADS")
        assert thread_count() == cpu_count()
        monkeypatch.setenv("TL_THREADS", "0")
        with pytest.raises(ConfigError, match="TL_THREADS"):
            thread_count()
    finally:
        torch.set_num_threads(saved)


def test_devices_auto_is_the_cpu_here_and_a_missing_gpu_is_a_clear_error():
    import torch

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu") or torch.backends.mps.is_available()
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            TrainConfig(device="cuda:1").resolved() and resolve_device("cuda:1")
        assert describe_auto_device().startswith(("CPU", "CUDA", "Apple"))
    with pytest.raises(ConfigError, match="Unknown device"):
        check_device_name("tpu")
    with pytest.raises(ConfigError, match="Unknown device"):
        TrainConfig(device="gpu0").resolved()
    rt = Runtime.create("cpu")
    assert rt.precision == "fp32" and rt.scaler is None and rt.is_main and not rt.distributed
    assert rt.to_dict() == {"device": "cpu", "precision": "fp32", "world_size": 1}


def test_balanced_sampling_gives_every_rank_the_same_number_of_steps():
    import numpy as np
    import torch

    w = np.array([5.0] * 3 + [1.0] * 14)  # 17 images: not a multiple of 2 ranks
    one = BalancedSampler(w, seed=3)
    ranks = [BalancedSampler(w, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in [one, *ranks]:
        s.set_epoch(1)
    assert len(ranks[0]) == len(ranks[1]) == 9 and len(list(ranks[0])) == len(list(ranks[1])) == 9
    both = list(ranks[0]) + list(ranks[1])
    # the ranks take turns in one global draw: interleaved, they are what one process draws from the same seed
    g = torch.Generator().manual_seed(3 + 1000003 * 1)
    assert [i for pair in zip(*ranks) for i in pair] == torch.multinomial(
        torch.as_tensor(w, dtype=torch.double), 18, replacement=True, generator=g).tolist()
    assert max(both.count(i) for i in range(3)) > 1  # drawn with replacement: a rare image comes back
    assert np.mean([i < 3 for i in both]) > 3 / 17  # the rare class is drawn more than its share
    ranks[0].set_epoch(2)
    assert list(ranks[0]) != list(ranks[1])


def test_torchrun_failure_summary_names_the_rank_and_the_signal():
    text = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
    Failures:
      <NO_OTHER_FAILURES>
    Root Cause (first observed failure):
    [0]:
      time      : 2026-11-30_19:50:01
      host      : box
      rank      : 1 (local_rank: 1)
      exitcode  : -9 (pid: 4242)
      error_file: <N/A>"""
    assert failure_reason(text, 2) == "Process 1 of the 2-process training group was killed (SIGKILL); the run failed."
    assert failure_reason("rank : 0 (local_rank: 0)\n exitcode : 3 (pid: 1)", 4).endswith("exited with code 3; "
                                                                                          "the run failed.")
    assert failure_reason("all good", 2) is None


# ==================================================================================================
# 2 processes, gloo, on the CPU
# ==================================================================================================
@pytest.mark.slow
def test_two_process_fine_tune_matches_one_process(tmp_path, ddp_data, capsys):
    home = tmp_path / "home"
    a = _train_here(capsys, home, str(ddp_data), *FULL)
    elastic = _torchelastic_dirs()
    t0 = time.monotonic()
    two = _cli(home, "train", str(ddp_data), *FULL, "--nproc", "2", "--json", "--quiet")
    took = time.monotonic() - t0
    assert two.returncode == 0, two.stderr[-3000:]
    b = json.loads(two.stdout)  # stdout is exactly one JSON document
    assert a["world_size"] == 1 and b["world_size"] == 2 and b["status"] == "done" and b["device"] == "cpu"
    assert b["run_id"] != a["run_id"] and Path(b["run_dir"]).is_dir()
    assert abs(a["val_accuracy"] - b["val_accuracy"]) <= DDP_TOLERANCE, (a["val_accuracy"], b["val_accuracy"])
    assert b["val_accuracy"] >= 0.6  # 5 classes: it learned
    meta = RunFiles(b["run_dir"]).meta()
    assert meta.runtime == {"device": "cpu", "precision": "fp32", "world_size": 2}
    history = RunFiles(b["run_dir"]).metrics().history
    assert [h["epoch"] for h in history] == [0, 1]  # the probe, then the epoch, recorded once (rank 0)
    assert _group_processes(home) == []
    # torchrun's own folder was the run's, and is gone: nothing left in the temporary folder
    assert _torchelastic_dirs() == elastic and not list((home / "runs").glob(".*.torchrun"))
    print(f"\n[ddp] full fine-tune, 2 x gloo: val {b['val_accuracy']:.3f} vs 1 process {a['val_accuracy']:.3f}; "
          f"{took:.0f}s wall")


@pytest.mark.slow
def test_two_process_linear_probe_equals_the_one_process_probe(tmp_path, ddp_data, capsys):
    """Features sharded across the ranks and gathered, the probe fitted once: the same model as one process."""
    home = tmp_path / "home"
    # auto (the default) with a budget the probe alone overruns: it never tries the fine-tune, in either run (a
    # 20-per-class set leaves room for one, and whether it fit 120 s depended on the machine's speed; how every rank
    # follows rank 0's tries is tests/test_auto.py's)
    budget = ["--time-budget", "1"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--log-dir", str(tmp_path / "torchrun"), "-m", "tl_core.cli", "train", str(ddp_data), *budget, "--json", "--quiet"], capture_output=True,
                         text=True, timeout=900,
                         env={**os.environ, "TL_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)})
    # both streams on a failure: a rank's own error may be a JSON document on stdout
    assert out.returncode == 0, out.stderr[-3000:] + "\n--- stdout:\n" + out.stdout[-2000:]
    two = json.loads(out.stdout)  # only rank 0 printed
    assert two["world_size"] == 2 and two["status"] == "done"
    one = _train_here(capsys, home, str(ddp_data), *budget)
    assert one["world_size"] == 1
    p1 = RunFiles(one["run_dir"]).predictions().get("val")
    p2 = RunFiles(two["run_dir"]).predictions().get("val")
    assert p1.paths == p2.paths
    assert abs(p1.logits - p2.logits).max() < 1e-3 and one["val_accuracy"] == two["val_accuracy"]
    assert (one["features"], one["linear_c"], one["cv"]) == (two["features"], two["linear_c"], two["cv"])  # auto
    assert _group_processes(home) == []


@pytest.mark.slow
def test_cancel_stops_every_rank_of_a_worker_group(tmp_path, ddp_data, monkeypatch):
    """The app's path: a worker trains the run as a torchrun group (TL_TRAIN_PROCS=2); Cancel stops both."""
    from tl_core.storage.workspace import Workspace

    home = tmp_path / "home"
    monkeypatch.setenv("TL_HOME", str(home))
    monkeypatch.setenv("TL_TRAIN_PROCS", "2")
    monkeypatch.setenv("TL_MAX_WORKERS", "1")
    ws = Workspace(home)
    run_id = tasks.submit_training(ws, ddp_data, TrainConfig(strategy="full", epochs=50, batch_size=4, patience=0,
                                                             augment="none"))
    store = ws.store()
    wait_for(lambda: (store.get(run_id).get("progress") or {}).get("stage") == "train", 300, "training steps")
    ranks = [_rank_pid(home, r) for r in (0, 1)]
    assert all(ranks), ranks
    t0 = time.monotonic()
    tasks.cancel_run(ws, run_id)
    wait_for(lambda: store.get(run_id)["status"] not in ("queued", "running"), 60, "the run to stop")
    row = store.get(run_id)
    assert row["status"] == "cancelled", row
    wait_for(lambda: not any(alive(p) for p in ranks), 30, "both ranks to exit")
    took = time.monotonic() - t0
    task = store.tasks(kind="train")[0]
    wait_for(lambda: store.task(task["id"])["status"] != "running", 30, "the task to end")
    assert store.task(task["id"])["status"] == "cancelled"
    wait_for(lambda: _group_processes(home) == [], 30, "no process of the group to remain")
    print(f"\n[ddp] cancel stopped both ranks in {took:.1f}s ({row['error']})")


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_and_leaves_no_process(tmp_path, ddp_data):
    home = tmp_path / "home"
    env = {**os.environ, "TL_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}
    parent = subprocess.Popen([sys.executable, "-m", "tl_core.cli", "train", str(ddp_data), "--strategy", "full",
                               "--epochs", "50", "--batch-size", "4", "--patience", "0", "--nproc", "2", "--json",
                               "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    from tl_core.storage.workspace import Workspace

    store = Workspace(home).store()
    run_id = wait_for(lambda: store.list() and store.list()[0]["id"], 120, "the run to be created")
    wait_for(lambda: (store.get(run_id).get("progress") or {}).get("stage") == "train", 300, "training steps")
    victim = _rank_pid(home, 1)
    assert victim
    os.kill(victim, signal.SIGKILL)
    out, err = parent.communicate(timeout=180)
    assert parent.returncode == 1
    row = store.get(run_id)
    assert row["status"] == "failed"
    assert "Process 1 of the 2-process training group was killed (SIGKILL)" in row["error"], row["error"]
    assert json.loads(out)["status"] == "failed" and "error: run" in err
    wait_for(lambda: _group_processes(home) == [], 30, "no process of the group to remain")
    assert not (Workspace(home).run_dir(run_id) / "model.safetensors").exists()
