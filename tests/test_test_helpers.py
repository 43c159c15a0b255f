"""The test suite's own process hygiene: interrupting a test run (Ctrl-C) or failing a test that
started processes leaves no process behind (tests/helpers.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

# A test file run by an inner pytest: it starts a process through helpers.start_process that starts
# a grandchild (as torchrun starts ranks), records both pids, then blocks in wait_process (as the
# trainer tests do) or fails without waiting.
INNER = '''
import os, sys, time
sys.path.insert(0, {tests!r})
from helpers import start_process, wait_process

CHILD = (
    "import os, subprocess, sys, time\\n"
    "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\\n"
    "open(sys.argv[1], 'w').write(f'{{os.getpid()}} {{g.pid}}')\\n"
    "time.sleep(600)\\n")

def test_blocks(tmp_path):
    proc = start_process([sys.executable, "-c", CHILD, {pids!r}])
    if {fail!r}:
        while not os.path.exists({pids!r}) or not open({pids!r}).read():
            time.sleep(0.05)
        raise AssertionError("fails while its process runs")
    wait_process(proc, timeout=600)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its new parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _inner_run(tmp_path, fail: bool):
    pids = tmp_path / "pids"
    test = tmp_path / "test_inner.py"
    test.write_text(INNER.format(tests=str(REPO / "tests"), pids=str(pids), fail=fail))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (pids.exists() and pids.read_text()):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the inner test never started its process"
        time.sleep(0.1)
    return proc, [int(p) for p in pids.read_text().split()]


def _gone(pids, timeout=20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "failed test"])
def test_no_orphans(tmp_path, how):
    proc, pids = _inner_run(tmp_path, fail=how == "failed test")
    try:
        if how == "ctrl-c":
            os.kill(proc.pid, signal.SIGINT)  # what the terminal sends to pytest on Ctrl-C
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode != 0, out
        assert _gone(pids) == [], f"left running after the test run ended: {pids}\n{out}"
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
