"""The fast tier starts no process: the guard in tests/conftest.py refuses each way of starting one."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest

from conftest import SubprocessInFastTier, in_fast_tier


def test_this_test_is_in_the_fast_tier(request):
    assert in_fast_tier(request.node) and request.node.get_closest_marker("fast_tier")


@pytest.mark.parametrize("start", [
    lambda: subprocess.run([sys.executable, "-c", "pass"]),
    lambda: multiprocessing.get_context("fork").Process(target=print).start(),
    lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
    lambda: os.fork(),
    lambda: os.system("true"),
], ids=["subprocess", "mp-fork", "mp-spawn", "os.fork", "os.system"])
def test_starting_a_process_fails_a_fast_test_with_what_to_do(start):
    with pytest.raises(SubprocessInFastTier, match="Mark the test @pytest.mark.processes"):
        start()


@pytest.mark.processes
def test_a_marked_test_may_start_one(request):
    assert not in_fast_tier(request.node)
    assert subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout == "42\n"
