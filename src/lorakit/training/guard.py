"""What protects a run's output directory while it trains: one run at a time, writable, a clean stop on a
signal, and a full disk reported as such.

    with RunGuard(out) as guard:          # lock taken, writability checked, SIGINT/SIGTERM caught
        for step in ...:
            ...
            if guard.stop_signal:         # the loop writes a checkpoint, then raises guard.stopped(...)

The lock is `fcntl.flock` on `<output>/.lorakit.lock`: the kernel drops it when the process dies, however
it dies, so a crashed or killed run never leaves a stale lock behind (no PID files to clean up).
"""
from __future__ import annotations

import errno
import os
import signal
import tempfile
from pathlib import Path
from types import FrameType

from lorakit.core.errors import LorakitError

LOCK_NAME = ".lorakit.lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class TrainingStopped(LorakitError):
    """SIGINT or SIGTERM arrived: the run wrote a checkpoint and stopped; --resume continues it."""


class RunLocked(LorakitError):
    """Another process holds the output directory's lock."""


def check_writable(out: Path) -> None:
    """Create `out` if needed and write a probe file in it.

    Raises:
        LorakitError: the directory cannot be created or written (read-only, no permission, no space).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LorakitError(f"the output directory {out} is not writable ({e.strerror or e}); choose another --output "
                           "or fix its permissions. Nothing was trained.") from e


def disk_full_error(e: OSError, what: str, latest: Path | None) -> LorakitError:
    """The LorakitError for an ENOSPC/EDQUOT while writing `what`, naming the checkpoint that survived."""
    kept = f"the last complete checkpoint {latest} is intact" if latest else "no checkpoint was written yet"
    return LorakitError(f"no space left on the device while writing {what} ({e.filename or e.strerror}); {kept} and "
                        "no partial checkpoint was kept. Free some space, then run the same command with --resume.")


class RunGuard:
    """The output directory's lock, writability check and signal handling for one `lorakit train`.

    Args:
        out: the run directory.
        enabled: False on the non-main processes of a distributed run (rank 0 guards the directory).
    """

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.out, self.enabled = out, enabled
        self.stop_signal: int | None = None
        self._lock_fd: int | None = None
        self._created_out = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "RunGuard":
        if not self.enabled:
            return self
        self._created_out = not self.out.exists()
        check_writable(self.out)
        self._lock()
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread (e.g. train() called from a worker thread): no handlers
                break
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._lock_fd is not None:
            if self._created_out and self._holds_only_the_lock():
                # a run that failed before writing anything leaves no directory behind (e.g. a wrong --model)
                os.unlink(self.out / LOCK_NAME)
                os.rmdir(self.out)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _holds_only_the_lock(self) -> bool:
        try:
            return [p.name for p in self.out.iterdir()] == [LOCK_NAME]
        except OSError:
            return False

    def _lock(self) -> None:
        import fcntl

        path = self.out / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"another `lorakit train` (pid {holder}) is writing to {self.out}; wait for it to finish, "
                            "stop it, or choose another --output.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None:  # a second Ctrl-C: stop now, without the checkpoint
            raise KeyboardInterrupt
        self.stop_signal = signum

    def stopped(self, step: int, checkpoint: Path | None) -> TrainingStopped:
        """The error that ends a run stopped by a signal after step `step`."""
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal"
        where = f"checkpoint {checkpoint} written" if checkpoint else "no checkpoint could be written"
        return TrainingStopped(f"stopped by {name} after step {step}; {where}. Run the same command with --resume "
                               "to continue.")
