"""What keeps a run's output safe: one run per folder, a clean stop on a signal, room on disk.

* `RunLock`: `outputs/<run>/.lock` holds the owner's pid, host and start time. A second run into the same
  folder is refused with the owner named; a lock left by a dead process on this host is taken over.
* `GracefulStop`: the first SIGTERM/SIGINT sets a flag that the loop checks after each step (it then
  saves a checkpoint and exits 0); a second signal exits at once (status 130 / 143).
* `check_output_writable`: before any work, the folder must be writable and hold at least the bytes one
  checkpoint needs; otherwise fail now, not after hours of training.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path


class RunLockedError(RuntimeError):
    pass


class OutputNotWritableError(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive ownership of an output folder, released on exit (context manager)."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".lock"
        self.held = False

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._clear_stale():
                    raise RunLockedError(self._describe_owner()) from None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self.held = True
            return self
        raise RunLockedError(self._describe_owner())

    def _read_owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _clear_stale(self) -> bool:
        """Remove a lock whose owner process on this host is gone; True when removed."""
        owner = self._read_owner()
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
                and not _pid_alive(owner["pid"]):
            self.path.unlink(missing_ok=True)
            return True
        return False

    def _describe_owner(self) -> str:
        owner = self._read_owner()
        return (f"{self.path.parent} is in use by another run (pid {owner.get('pid', '?')} on host "
                f"{owner.get('host', '?')}, started {owner.get('started', '?')}); wait for it, choose another "
                f"training.output_dir, or delete {self.path} if that run is gone")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class GracefulStop:
    """Install SIGTERM/SIGINT handlers: first signal requests a stop, a second one exits at once."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            print(f"\n[wanlora] second signal ({signal.Signals(signum).name}): exiting now", file=sys.stderr,
                  flush=True)
            os._exit(128 + signum)
        self.requested = signum
        print(f"\n[wanlora] {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    @property
    def stop(self) -> bool:
        return self.requested is not None

    def __enter__(self) -> "GracefulStop":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def check_output_writable(output_dir: str | Path, need_bytes: int) -> None:
    """Fail before training when `output_dir` cannot be written or has less free space than `need_bytes`."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        raise OutputNotWritableError(f"{output_dir}: cannot write there ({err.strerror}); choose a writable "
                                     f"training.output_dir") from None
    free = shutil.disk_usage(output_dir).free
    if free < need_bytes:
        raise OutputNotWritableError(
            f"{output_dir}: only {free / 2**20:.0f} MiB free, a checkpoint needs about {need_bytes / 2**20:.0f} MiB; "
            f"free some space or choose another training.output_dir")
