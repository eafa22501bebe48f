"""Every patch of Flower internals in one place, each naming the flwr version it was written against.

pp-flower pins flwr 1.42.x (pyproject). The patches below reach into modules that are not Flower's public
API, so each calls :func:`check_flower_version` first: with another flwr they refuse loudly instead of
silently changing nothing (or the wrong thing). tests/test_flower_patches.py fails with the same message when
the installed flwr is not the pinned one.

| patch (flwr 1.42) | internals it touches | what it changes |
|---|---|---|
| install_event_driven_dispatch | vce_api.add_messages_to_queue, InMemoryGrid.push_messages | simulation dispatch wakes on push instead of polling every 100 ms |
| run_simulation_engine | flwr.simulation.run_simulation._run_simulation | runs a ServerApp + ClientApp pair with our Context and backend config |
| install_fast_polling | start_client_internal.time, HEARTBEAT_DEFAULT_INTERVAL | SuperNode idle poll 3 s → 0.05 s, reply poll 0.5 s → 0.01 s, heartbeat 30 s → 10 s |
| use_warm_superexec | start_client_internal.subprocess | the SuperNode starts sims.superexec instead of flower-superexec |
| install_warm_clientapp | subprocess_executor.subprocess | the SuperExec forks ClientApp processes from a warm template |
| profile_clientapp_phases | flwr.supernode.runtime.run_clientapp functions | logs each phase's duration (benchmarks only) |
| plain_logs_when_piped | flwr.supercore.logger.update_console_handler | no ANSI colour codes in Flower's log lines when stderr is not a terminal |
"""

from __future__ import annotations

import os
import subprocess
import sys
import time as _time

from pp_flower.errors import PPFlowerError

FLWR_SERIES = "1.42"  # the minor version every patch here was written against (pyproject pins >=1.42,<1.43)


def check_flower_version(installed: str | None = None) -> None:
    """Refuse to patch a Flower these patches were not written for."""
    if installed is None:
        from importlib.metadata import version

        installed = version("flwr")
    if installed.split(".")[:2] != FLWR_SERIES.split("."):
        raise PPFlowerError(
            f"flwr {installed} is installed, but pp-flower patches internals of flwr {FLWR_SERIES}.x "
            f"(sims/flower_patches.py). Install flwr>={FLWR_SERIES},<1.43 (pip install -e .), or port those patches."
        )


# ------------------------------------------------------------------------------------------ simulation


_DISPATCH_PATCHED = False


def install_event_driven_dispatch() -> None:
    """Deliver provider messages to simulated users as soon as they are pushed.

    Flower 1.42's simulation engine moves messages from its LinkState to the Ray workers in a loop that
    sleeps 100 ms between polls (``vce_api.add_messages_to_queue``), which adds ~50 ms on average to every
    protocol round. We replace that loop with the same loop woken by an event that ``InMemoryGrid.push_messages``
    sets, falling back to the same 100 ms poll. Behaviour is otherwise unchanged (flwr is pinned to 1.42.x).
    """
    global _DISPATCH_PATCHED
    if _DISPATCH_PATCHED:
        return
    check_flower_version()
    import threading

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    pushed = threading.Event()
    original_push = InMemoryGrid.push_messages

    def push_messages(self, messages):
        ids = original_push(self, messages)
        pushed.set()
        return ids

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        while not f_stop.is_set():
            pushed.clear()
            for node_id in nodes_mapping.keys():
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            pushed.wait(0.1)

    InMemoryGrid.push_messages = push_messages
    vce_api.add_messages_to_queue = add_messages_to_queue
    _DISPATCH_PATCHED = True


def run_simulation_engine(server_app, client_app, num_supernodes: int, backend_config: dict, context,
                          verbose: bool = False) -> None:
    """Flower's simulation engine with our ServerApp Context (``run_simulation`` cannot take one)."""
    check_flower_version()
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    server_app=server_app, client_app=client_app, backend_name="ray",
                    backend_config=backend_config, server_app_context=context, verbose_logging=verbose)


# ------------------------------------------------------------------------------------- SuperNode, SuperExec


class _FastTime:
    """The ``time`` module as seen by flwr's SuperNode loop, with its fixed sleeps shortened."""

    def __init__(self, idle: float, reply: float):
        self._idle, self._reply = idle, reply

    def sleep(self, seconds: float) -> None:
        if seconds >= 3:
            seconds = self._idle
        elif seconds >= 0.5:
            seconds = self._reply
        _time.sleep(seconds)

    def __getattr__(self, name):
        return getattr(_time, name)


def install_fast_polling(idle: float | None = None, reply: float = 0.01, heartbeat: float | None = None) -> None:
    """Shorten the SuperNode's fixed waits (sims/supernode.py says why)."""
    check_flower_version()
    from flwr.supercore import heartbeat as heartbeat_module
    from flwr.supernode import fleet_http_connection, start_client_internal

    idle = float(os.environ.get("PPFLOWER_SUPERNODE_POLL", "0.05")) if idle is None else idle
    start_client_internal.time = _FastTime(idle, reply)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.02")
    # Heartbeat every 10 s (Flower's minimum; default 30 s): a dead node is marked offline after 20 s instead of
    # 60 s, and only then may a restarted node with the same key activate again.
    heartbeat = float(os.environ.get("PPFLOWER_SUPERNODE_HEARTBEAT", "10")) if heartbeat is None else heartbeat
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    heartbeat_module.HEARTBEAT_DEFAULT_INTERVAL = heartbeat


def use_warm_superexec() -> None:
    """Start ``sims.superexec`` (ClientApp processes forked from a pre-imported template) as the SuperExec."""
    check_flower_version()
    from flwr.supernode import start_client_internal

    def route(args: list[str]) -> list[str]:
        return [sys.executable, "-m", "sims.superexec", *args[1:]] if args[0] == "flower-superexec" else args

    route_popen(start_client_internal, route)


def route_popen(module, route) -> None:
    """Make ``module.subprocess.Popen(args)`` call ``route(args)`` first: it returns the argument list to start
    (possibly rewritten), or None when it has started the task itself. Used on flwr 1.42's SuperNode (which
    starts ``flower-superexec``) and SuperExec (which starts ``flwr-clientapp``)."""
    popen = subprocess.Popen

    class _Subprocess:
        def __getattr__(self, name):
            return getattr(subprocess, name)

        @staticmethod
        def Popen(args, *rest, **kwargs):  # noqa: N802 - same name as subprocess.Popen
            if isinstance(args, list) and args and not rest and not kwargs:  # (kwargs: e.g. suppressed output)
                args = route(args)
                if args is None:
                    return None
            return popen(args, *rest, **kwargs)

    module.subprocess = _Subprocess()


def install_warm_clientapp(launch) -> None:
    """Make flwr's subprocess executor hand ``flwr-clientapp`` tasks to ``launch(argv)`` (True: it started them)."""
    check_flower_version()
    from flwr.supercore.superexec.executor import subprocess_executor

    def route(args: list[str]) -> list[str] | None:
        if args[0] == "flwr-clientapp" and launch(args[1:]):
            return None
        return args

    route_popen(subprocess_executor, route)


def profile_clientapp_phases() -> None:
    """Log how long each phase of Flower's ClientApp process takes (``PPFLOWER_WARM_PROFILE=1``)."""
    import time

    check_flower_version()
    from flwr.supernode.runtime import run_clientapp as rc

    start = time.perf_counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                print(f"ppflower-superexec: pid {os.getpid()} {name} {time.perf_counter() - t0:.3f} s "
                      f"(at {t0 - start:.3f} s)", file=sys.stderr, flush=True)
        return wrapper

    for name in ("pull_task_input", "install_from_fab", "push_message", "push_task_output"):
        setattr(rc, name, timed(name, getattr(rc, name)))
    load = rc.get_load_client_app_fn

    def get_load(*args, **kwargs):
        return timed("load_client_app", load(*args, **kwargs))

    rc.get_load_client_app_fn = get_load
    from flwr.clientapp import ClientApp

    ClientApp.__call__ = timed("client_app", ClientApp.__call__)


def plain_logs_when_piped() -> None:
    """Flower colours its log lines with ANSI codes; keep them only when stderr is a terminal."""
    check_flower_version()
    from flwr.supercore.logger import update_console_handler

    update_console_handler(colored=sys.stderr.isatty())
