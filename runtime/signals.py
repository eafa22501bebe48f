"""One way out for every long command: Ctrl-C, SIGTERM and SIGHUP all interrupt it the same way.

* The first signal raises ``KeyboardInterrupt`` in the main thread (what Ctrl-C does), so every ``finally``
  runs and child processes are stopped; the command then prints its one "rerun to resume" line, exit 130.
* A second signal while the command is stopping is ignored (a note says so), so an impatient double Ctrl-C
  cannot cut the clean-up short; a third ends the process at once (exit 130).
* typer turns a ``KeyboardInterrupt`` into a silent ``Exit(130)`` before the caller's ``except`` sees it;
  :func:`interrupted` tells the caller that this exit came from a signal (so it can print the line).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
RESUME_LINE = "interrupted — rerun the same command to resume."
NESTED = "PPFLOWER_INTERRUPT_REPORTED_BY_PARENT"  # set for child commands (reproduce's simulations)
_received: list[int] = []
_on_first: list = []  # callables run on the first signal, before KeyboardInterrupt is raised (e.g. quiet logs)


def _handler(signum, frame) -> None:
    _received.append(signum)
    if len(_received) == 1:
        for hook in list(_on_first):
            try:
                hook()
            except Exception:  # noqa: BLE001 - a hook must never stop the interrupt
                pass
        raise KeyboardInterrupt
    if len(_received) == 2:
        try:
            os.write(2, b"still stopping (a third signal ends the process at once)\n")
        except OSError:
            pass
        return
    os._exit(130)


def install(on_first=None) -> None:
    """Route SIGINT, SIGTERM and SIGHUP to :func:`_handler` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if on_first is not None and on_first not in _on_first:
        _on_first.append(on_first)
    for sig in SIGNALS:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue  # started under nohup: a closed terminal must not stop the run
        signal.signal(sig, _handler)


def interrupted() -> bool:
    """True once a signal interrupted this process."""
    return bool(_received)


def mark_interrupted() -> None:
    """A child process was interrupted: this process stops as if it had been (its resume line, exit 130)."""
    if not _received:
        _received.append(0)


def print_resume_line(where: str = "") -> None:
    """The interrupt's one line; from here on the process only exits, and further signals are ignored (Python
    restores their default handlers while it shuts down, so one more Ctrl-C would otherwise kill it: exit −2)."""
    line = RESUME_LINE if not where else RESUME_LINE[:-1] + f" ({where})."
    try:  # the terminal or pipe may be gone (SIGHUP from a closed terminal, a killed parent): stop all the same
        sys.stdout.flush()
        if not os.environ.get(NESTED):  # a child of a command that prints the line itself stays quiet
            print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def stop_child(proc, grace: float = 60.0) -> None:
    """Interrupt a child process (SIGINT, as Ctrl-C would) and wait for it; SIGKILL after ``grace`` seconds."""
    import subprocess

    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


try:  # resolved here, not in the forked child (loading a library between fork and exec may deadlock)
    import ctypes

    _PRCTL = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # not Linux/glibc: children are still stopped by stop_child
    _PRCTL = None


def die_with_parent() -> None:
    """``preexec_fn`` for children: SIGTERM them when this process dies, even by SIGKILL (Linux prctl)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
