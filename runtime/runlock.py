"""One run per directory: a run dir (and the --out of a resumable command) is locked while a run uses it.

The lock is ``flock`` on ``DIR/.ppflower.lock``, held by the process for as long as it runs: the kernel
releases it when the process ends, however it ends (SIGKILL included), so a lock file left behind by a dead
run never blocks the next one. The file records who held it last (pid, command, start time) for the refusal
message. Within one process the lock is re-entrant (flower-simulation's driver and its in-process ServerApp
both take the run dir's lock). The descriptor is not inherited by child processes (O_CLOEXEC).
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from pathlib import Path

from pp_flower.errors import PPFlowerError

LOCK_NAME = ".ppflower.lock"
_HELD: dict[str, list[int]] = {}  # realpath of the lock file → [fd, count], in this process


def lock_dir(directory: str | os.PathLike, what: str = "run dir") -> str:
    """Lock ``directory`` (created if missing) for this process; refuse with one line if another run holds it.

    Returns the key to :func:`unlock_dir` (optional: the lock goes with the process)."""
    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 4096).decode(errors="replace").strip().replace("\n", " ")
        finally:
            os.close(fd)
        raise PPFlowerError(f"{what} {directory} is in use by another run ({holder or 'another process'}); wait for "
                            f"it to end or stop it, or choose another {what}.") from None
    os.ftruncate(fd, 0)
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]
    os.write(fd, f"pid {os.getpid()}, `{command}`, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    _HELD[key] = [fd, 1]
    return key


def unlock_dir(key: str) -> None:
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] <= 0:
        del _HELD[key]
        os.close(held[0])  # closing the descriptor releases the flock
