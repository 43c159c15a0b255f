"""The run directory's lock: one trainer at a time writes a run directory.

Rank 0 takes an exclusive ``fcntl.flock`` on ``<run>/.lock`` before anything is written into the
directory and holds it for the job's lifetime; the file records the holder (JSON: ``host``, ``pid``,
``start`` (Unix time), ``argv``; ``released`` once it let go). A second trainer on the same
directory (a double submit, a requeue racing a job that still runs) fails to take it and is refused
with :class:`RunDirectoryInUse` naming the holder, before it writes anything.

Stale locks. The kernel releases a flock when its holder's process ends, however it ends (SIGKILL
included), so on one host a held lock always belongs to a live process. (Forked children, such as
data-loader workers, do not keep it: this module closes the descriptor in them.) A trainer that
ended without releasing (killed, or its node crashed) leaves only the file's content behind; the
next trainer takes the lock over and notes it (:meth:`RunLock.takeover_note`).

Across hosts a flock excludes only where the shared filesystem implements it for all its clients:
NFS (Linux maps flock to NFS byte-range locks: NFSv4, or NFSv3 with lockd; not with the ``nolock``,
``local_lock=flock`` or ``local_lock=all`` mount options; a crashed client's lock is freed when its
lease expires, ~90 s), Lustre mounted with ``-o flock`` (not ``localflock``), GPFS, CephFS. Where
it does not, trainers on two hosts both get the lock; the second can only warn when the file names
a holder on another host that never released it (it may still be running, which cannot be checked
from here). On a filesystem that refuses flock (ENOLCK, EOPNOTSUPP) the trainer warns and runs
without a lock.

A refused or failed start (a resume plan refused, a bad setting) releases the lock with
``restore=True``: the file gets its previous bytes back, or goes if this start created it, so the
directory is byte-identical to before.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".lock"

_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_in_child() -> None:
    # A forked child shares the lock's open file description: as long as it keeps the descriptor,
    # the lock would outlive the trainer (a data-loader worker of a killed trainer). Closing the
    # child's copy leaves the parent's lock in place (only LOCK_UN or the last close releases it).
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirectoryInUse(UserError):
    """Another trainer holds the run directory's lock."""


def _read(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


def _parse(content: bytes | None) -> dict | None:
    try:
        info = json.loads(content or b"")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_holder(info: dict | None) -> str:
    """``pid P on host H, started <time> (<command>)`` from a lock file's content."""
    if not info or "pid" not in info:
        return "a trainer that has not recorded itself yet"
    start = datetime.fromtimestamp(info.get("start", 0)).isoformat(sep=" ", timespec="seconds")
    text = f"pid {info['pid']} on host {info.get('host', '?')}, started {start}"
    return text + (f" ({info['argv']})" if info.get("argv") else "")


class RunLock:
    """An exclusive lock on a run directory, held until :meth:`release` or the process ends."""

    def __init__(self, path: Path, fd: int, previous: bytes | None, info: dict):
        self.path, self.fd, self.previous, self.info = path, fd, previous, info

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock | None:
        """Lock ``run_dir`` (which must exist) or raise :class:`RunDirectoryInUse` naming the holder.
        None (with a warning on stderr) where the filesystem does not support locks."""
        path = Path(run_dir) / LOCK_NAME
        for _ in range(100):
            created = True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:  # removed by a refused start in the meantime
                    continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                content = _read(fd)
                os.close(fd)
                raise RunDirectoryInUse(_in_use_message(Path(run_dir), path, _parse(content))) from None
            except OSError as exc:
                os.close(fd)
                if created:
                    path.unlink(missing_ok=True)
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                print(f"newtonlm: warning: the filesystem of {run_dir} does not support locks ({exc}): "
                      "nothing stops a second trainer from writing this run directory", file=sys.stderr)
                return None
            # a refused start may have unlinked the file we opened: then lock the one at the path now
            try:
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is None or (current.st_ino, current.st_dev) != (mine.st_ino, mine.st_dev):
                os.close(fd)
                continue
            info = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time(),
                    "argv": " ".join(sys.argv)[:300]}
            lock = cls(path, fd, None if created else _read(fd), info)
            lock._write(json.dumps(info).encode())
            _HELD.add(fd)
            return lock
        raise RuntimeError(f"could not lock {path}: it was replaced 100 times in a row")

    def _write(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def takeover_note(self) -> str | None:
        """A note when the previous holder never released the lock (killed, crashed; or, on another
        host, perhaps still running where locks do not reach across hosts); None otherwise."""
        prev = _parse(self.previous)
        if not prev or prev.get("released") or "pid" not in prev:
            return None
        who = describe_holder(prev)
        if prev.get("host") == self.info["host"]:
            return f"the previous trainer of this run directory ({who}) ended without releasing its lock " \
                   "(killed?); taking it over"
        return (f"{self.path} names a trainer on another host that never released it ({who}): it was "
                "killed, or it still runs and this filesystem's locks do not reach across hosts (see "
                "newtonlm/training/lock.py); if it still runs, stop this job now")

    def release(self, restore: bool = False) -> None:
        """Let go of the lock. ``restore``: give the file its previous bytes back (or remove it if this
        lock created it): a refused start leaves the directory as it found it. Otherwise the file
        records that the holder released it."""
        if self.fd is None:
            return
        try:
            if restore and self.previous is None:
                self.path.unlink(missing_ok=True)  # while still locked: see acquire's inode check
            elif restore:
                self._write(self.previous)
            else:
                self._write(json.dumps({**self.info, "released": time.time()}).encode())
        except OSError:
            pass  # e.g. a full disk: the lock itself is released below all the same
        finally:
            _HELD.discard(self.fd)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _in_use_message(run_dir: Path, path: Path, info: dict | None) -> str:
    who = describe_holder(info)
    if info and info.get("host") == socket.gethostname() and "pid" in info and not _pid_alive(info["pid"]):
        who += (f"; pid {info['pid']} has ended, but a process it started still holds the lock and "
                "ends with it")
    return (f"run directory {run_dir} is in use by another trainer ({who}), which holds {path}: two "
            "trainers must not write one run directory (their checkpoints and metrics would interleave); "
            "wait for it to end or stop it, or use another hydra.run.dir. Nothing was written")
