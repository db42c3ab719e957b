"""One writer per run folder: an exclusive claim held while a run writes its records.

Run ids of a suite are deterministic (so a killed cell finds its checkpoint again), which means two
sweeps of the same suite, a SLURM requeue racing a job that is still alive, or ``--executor local``
next to ``--executor slurm`` would all target the same folder. The record is the single source of
truth, so a second writer must never start there: it gets :class:`RunDirBusy` and writes nothing.

The claim is an advisory ``flock`` on ``<run_dir>/.writer.lock``. The kernel drops it when its
process dies, so a killed or preempted run never leaves a stale claim behind (its file, left behind,
claims nothing), and on NFS the Linux client maps it to a POSIX lock the server arbitrates across nodes.
A finished run removes the file while it still holds the lock, so its folder holds only what the run
wrote; whoever locks a file that was removed meanwhile finds it is no longer the folder's lock file and
opens the new one (a lock on a removed file would claim nothing).
Inside one process the claim is re-entrant for the thread that holds it (the sweep claims a cell,
then the harness it calls claims the same folder) and exclusive against every other thread.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from diffprune_bench.errors import BenchError

try:  # POSIX; elsewhere only the in-process claim applies
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".writer.lock"

_HELD: dict[str, tuple[int, int, Any]] = {}  # folder -> (owning thread, depth, open lock file)
_GUARD = threading.Lock()


class RunDirBusy(BenchError):
    """Another process (or thread) is writing this run folder right now."""


def _key(run_dir: Path) -> str:
    return str(Path(run_dir).resolve())


def holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who holds the claim (host, pid, since): a live claim's holder, or a killed one's (a finished run
    leaves no lock file: None)."""
    try:
        return json.loads((Path(run_dir) / LOCK_NAME).read_text() or "null")
    except (OSError, json.JSONDecodeError):
        return None


def is_claimed(run_dir: str | Path) -> bool:
    """Whether some live process or thread holds the claim on ``run_dir`` now (without taking it)."""
    key = _key(Path(run_dir))
    with _GUARD:
        if key in _HELD:
            return True
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None:
        return False
    try:
        handle = open(path)  # noqa: SIM115 - never "a+": looking must not create the file again
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    return False


class RunDirClaim:
    """``with RunDirClaim(run_dir):`` holds the folder; raises :class:`RunDirBusy` when someone else does."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.key = _key(self.run_dir)
        self.acquired = False

    def acquire(self) -> RunDirClaim:
        me = threading.get_ident()
        with _GUARD:
            owner = _HELD.get(self.key)
            if owner is not None:
                if owner[0] != me:
                    raise self._busy("another thread of this process")
                _HELD[self.key] = (me, owner[1] + 1, owner[2])
                self.acquired = True
                return self
            self.run_dir.mkdir(parents=True, exist_ok=True)
            handle = self._lock_file()
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
            handle.flush()
            _HELD[self.key] = (me, 1, handle)
            self.acquired = True
        return self

    def release(self) -> None:
        if not self.acquired:
            return
        self.acquired = False
        with _GUARD:
            owner, depth, handle = _HELD[self.key]
            if depth > 1:
                _HELD[self.key] = (owner, depth - 1, handle)
                return
            del _HELD[self.key]
            try:  # removed while still locked: nothing left behind (see _lock_file for the race)
                (self.run_dir / LOCK_NAME).unlink()
            except FileNotFoundError:
                pass
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    def _lock_file(self) -> Any:
        """The folder's lock file, opened and locked (raises :class:`RunDirBusy` when someone holds it).

        A releasing holder removes the file before it unlocks, so a process that opened the file just
        before may lock a file that is no longer the folder's: it then opens the new one and tries again."""
        path = self.run_dir / LOCK_NAME
        while True:
            handle = open(path, "a+")  # noqa: SIM115 - held until release()
            if fcntl is None:
                return handle
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise self._busy(None) from None
            if _same_file(handle, path):
                return handle
            handle.close()  # closing drops the lock on the removed file

    def _busy(self, who: str | None) -> RunDirBusy:
        if who is None:
            info = holder(self.run_dir) or {}
            who = f"process {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}"
        return RunDirBusy(
            f"run folder {str(self.run_dir)!r} is being written by {who}; not starting a second writer"
        )

    def __enter__(self) -> RunDirClaim:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(handle: Any, path: Path) -> bool:
    """Whether the open ``handle`` is still the file at ``path`` (not one removed since it was opened)."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


class _NoClaim:
    """What ranks other than 0 hold: they never write the run folder."""

    def release(self) -> None:
        pass


def claim_run_dir(run_dir: str | Path, dist: Any = None) -> RunDirClaim | _NoClaim:
    """Claim ``run_dir`` for this run; on several processes rank 0 claims and every rank learns the
    outcome, so all of them stop with :class:`RunDirBusy` together (none waits at a collective)."""
    if dist is None or not dist.enabled:
        return RunDirClaim(run_dir).acquire()
    claim: RunDirClaim | _NoClaim = _NoClaim()
    refusal = None
    if dist.is_main:
        try:
            claim = RunDirClaim(run_dir).acquire()
        except RunDirBusy as error:
            refusal = str(error)
    refusal = dist.broadcast_object(refusal)
    if refusal is not None:
        raise RunDirBusy(refusal)
    return claim
