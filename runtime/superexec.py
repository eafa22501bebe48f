"""A SuperNode's SuperExec that starts each ClientApp process warm: forked from a pre-imported template process.

Flower 1.42 runs every message to a user in a new ``flwr-clientapp`` process. Most of that process's life is
spent importing Python, flwr and torch (≈ 4–5 s of CPU on a 2-core box, BENCHMARKS.md), not handling the
message. ``ppflower-supernode`` therefore starts this SuperExec instead of ``flower-superexec``: it is
``flower-superexec`` with every argument and behaviour kept, except that a ClientApp task is started by
``os.fork()`` from a *template* process that imported the heavy libraries once. The forked child then runs
Flower's own ``flwr-clientapp`` entry point with the same arguments a fresh process would get: it pulls the
message, installs the FAB and imports the app from the FAB (the app's own modules are never pre-imported, so
the code that runs is the code the provider submitted), handles the message, pushes the reply and exits.
One process per message, as in Flower; only the import cost is paid once.

The template is single-threaded and never runs torch (no thread pools or CUDA contexts exist to be broken by
``fork``). If it is missing or dies, tasks start the normal way (``flwr-clientapp`` subprocess).
The template freezes its imported heap out of the garbage collector (``gc.freeze``: a child's collections would
copy every page they touch), and a FAB is unpacked once per node, not per message (``install_fab_once``).
``PPFLOWER_WARM_PRELOAD`` lists the modules the template imports (comma-separated; default: torch, flwr's
ClientApp runtime and httpcore, which httpx imports on first use); ``PPFLOWER_WARM_CLIENTAPP=0`` turns the
template off; ``PPFLOWER_WARM_PROFILE=1`` logs how long each phase of every ClientApp process takes
(BENCHMARKS.md).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import subprocess
import sys
import threading

# httpcore: httpx imports it on a client's first use, 25 ms that every ClientApp process would pay again
DEFAULT_PRELOAD = "torch,flwr.app,flwr.clientapp,flwr.serverapp,flwr.supernode.cli.flwr_clientapp,httpcore"
FAB_PACKAGES = ("pp_flower", "strategies", "sims", "runtime")  # what the FAB ships (pyproject's fab-include)


# ------------------------------------------------------------------------------------------- the template


def template_main() -> None:
    """Import the heavy modules, then fork one ``flwr-clientapp`` per JSON argument list read from stdin."""
    for name in filter(None, os.environ.get("PPFLOWER_WARM_PRELOAD", DEFAULT_PRELOAD).split(",")):
        importlib.import_module(name.strip())
    from runtime.flower_patches import install_fab_once, install_fast_object_pulls

    install_fast_object_pulls()  # inherited by every forked ClientApp: it pulls its message without 1 s waits
    install_fab_once()  # ... and does not unpack the same FAB again for every message
    for name in [m for m in sys.modules if m.split(".")[0] in FAB_PACKAGES]:
        del sys.modules[name]  # the app's own modules must come from the FAB, never from this template
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped automatically
    gc.freeze()  # the imported heap stays shared: a child's collections would otherwise copy every page they touch
    print("ready", flush=True)
    os.dup2(2, 1)  # children print to the SuperNode's log, not into the readiness pipe
    for line in sys.stdin:  # EOF: the SuperExec has gone, and so do we
        try:
            argv = json.loads(line)
        except json.JSONDecodeError:
            continue
        pid = os.fork()
        if pid == 0:
            _run_clientapp(argv)
        print(f"ppflower-superexec: ClientApp process {pid} started warm", file=sys.stderr, flush=True)


def _run_clientapp(argv: list[str]) -> None:
    """In the forked child: become ``flwr-clientapp argv...`` (Flower's entry point, unchanged)."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.stdin.close()
        sys.argv = ["flwr-clientapp", *argv]
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        if os.environ.get("PPFLOWER_WARM_PROFILE") == "1":
            from runtime.flower_patches import profile_clientapp_phases

            profile_clientapp_phases()

        flwr_clientapp()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ------------------------------------------------------------------------------------------- the SuperExec


class WarmLauncher:
    """Starts the template process and hands it ClientApp launches; ``launch`` returns False when it cannot."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "runtime.superexec", "--template"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._wait_ready, daemon=True).start()

    def _wait_ready(self) -> None:
        if self.proc.stdout.readline().strip() == "ready":
            self.ready.set()

    def launch(self, argv: list[str]) -> bool:
        if not self.ready.is_set() or self.proc.poll() is not None:
            return False
        try:
            with self.lock:
                self.proc.stdin.write(json.dumps(argv) + "\n")
                self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


def install_warm_clientapp() -> WarmLauncher:
    """Patch flwr's subprocess executor so that ClientApp tasks are forked from the template."""
    from runtime import flower_patches

    launcher = WarmLauncher()
    flower_patches.install_warm_clientapp(launcher.launch)
    return launcher


def main() -> None:
    if sys.argv[1:] == ["--template"]:
        template_main()
        return
    from flwr.supercore.cli import flower_superexec

    from runtime.flower_patches import install_woken_superexec

    if os.environ.get("PPFLOWER_SUPEREXEC_WAKE"):
        install_woken_superexec(os.environ["PPFLOWER_SUPEREXEC_WAKE"])
    launcher = install_warm_clientapp() if os.environ.get("PPFLOWER_WARM_CLIENTAPP", "1") != "0" else None
    sys.argv[0] = "flower-superexec"
    try:
        sys.exit(flower_superexec())
    finally:
        if launcher is not None:
            launcher.close()


if __name__ == "__main__":
    main()
