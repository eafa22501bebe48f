"""Every patch of Flower internals in one place, each naming the flwr version it was written against.

pp-flower pins flwr 1.42.x (pyproject). The patches below reach into modules that are not Flower's public
API, so each calls :func:`check_flower_version` first: with another flwr they refuse loudly instead of
silently changing nothing (or the wrong thing). tests/test_robustness.py fails with the same message when
the installed flwr is not the pinned one.

Each patch (flwr 1.42), with the internals it touches in parentheses, and what it changes:

- ``install_event_driven_dispatch`` (vce_api.add_messages_to_queue/put_message_into_state,
  InMemoryLinkState.message_ins_store, InMemoryGrid.push_messages/pull_messages/get_node_ids): simulation dispatch
  wakes on push instead of polling every 100 ms and finds every node's next message in one pass; the ServerApp is
  woken by each stored reply (InMemoryGrid.wait_for_replies, new) instead of polling every 5 ms; the grid raises
  once the engine has stopped, so a ServerApp never outlives its engine.
- ``run_simulation_engine`` (flwr.simulation.run_simulation._run_simulation): runs a ServerApp + ClientApp
  pair with our Context and backend config.
- ``install_fast_polling`` (start_client_internal.time, _pull_and_store_message, _push_messages,
  HEARTBEAT_DEFAULT_INTERVAL): SuperNode idle poll 3 s → learned gap then 20 ms ×1.3 ≤ 0.5 s,
  reply poll 0.5 s → 0.01 s, heartbeat 30 s → 10 s; wakes the SuperExec per message.
- ``install_woken_superexec`` (run_superexec.time): SuperExec task poll 1 s → on wake-up from the SuperNode,
  else 0.5 s.
- ``install_fast_object_pulls`` (inflatable_utils.pull_objects defaults): first retry of a not-yet-uploaded
  object after 5 ms instead of 1 s.
- ``use_superexec`` (start_client_internal.subprocess): the SuperNode starts runtime.superexec instead of
  flower-superexec.
- ``install_warm_clientapp`` (subprocess_executor.subprocess): the SuperExec forks ClientApp processes from a
  warm template.
- ``install_fab_once`` (run_clientapp.install_from_fab): a FAB this node has already installed and verified is not
  extracted and verified again for every message.
- ``profile_clientapp_phases`` (flwr.supernode.runtime.run_clientapp functions): logs each phase's duration
  (benchmarks only).
- ``plain_logs_when_piped`` (flwr.supercore.logger.update_console_handler): no ANSI colour codes in Flower's
  log lines when stderr is not a terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading as _threading
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
            f"(runtime/flower_patches.py). Install flwr>={FLWR_SERIES},<1.43 (pip install -e .), or port those patches."
        )


# ------------------------------------------------------------------------------------------ simulation


_DISPATCH_PATCHED = False


def install_event_driven_dispatch() -> None:
    """Deliver provider messages to simulated users as soon as they are pushed.

    Flower 1.42's simulation engine moves messages from its LinkState to the Ray workers in a loop that
    sleeps 100 ms between polls (``vce_api.add_messages_to_queue``), which adds ~50 ms on average to every
    protocol round. We replace that loop with the same loop woken by an event that ``InMemoryGrid.push_messages``
    sets, falling back to the same 100 ms poll. The way back is woken the same way: the loop that stores replies
    sets an event that ``InMemoryGrid.wait_for_replies`` (new) waits on, so the provider pulls once per reply
    instead of every 5 ms through a user's step (each poll took CPU from the user's two torch threads).
    Behaviour is otherwise unchanged (flwr is pinned to 1.42.x).
    """
    global _DISPATCH_PATCHED
    if _DISPATCH_PATCHED:
        return
    check_flower_version()
    import threading
    from queue import Empty

    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    pushed = threading.Event()
    original_push = InMemoryGrid.push_messages

    def push_messages(self, messages):
        ids = original_push(self, messages)
        pushed.set()
        return ids

    def add_messages_to_queue(state, queue, nodes_mapping, f_stop):
        nodes = set(nodes_mapping.keys())
        one_pass = hasattr(state, "message_ins_store")  # InMemoryLinkState, as simulation always has
        while not f_stop.is_set():
            pushed.clear()
            if one_pass:
                for msg in _next_message_per_node(state, nodes):
                    queue.put(msg)
            else:
                for node_id in nodes:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
            pushed.wait(0.1)

    stored = threading.Event()

    def put_message_into_state(state, queue, f_stop):
        while not f_stop.is_set():
            try:
                reply = queue.get(timeout=1.0)
            except Empty:
                continue
            state.store_message_res(reply)
            stored.set()

    def wait_for_replies(self, timeout: float) -> None:
        """Return once a reply has been stored since the last call (or after ``timeout`` s); pull after it."""
        stored.wait(timeout)
        stored.clear()

    InMemoryGrid.push_messages = push_messages
    InMemoryGrid.wait_for_replies = wait_for_replies
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api.put_message_into_state = put_message_into_state
    _stop_grid_with_engine(InMemoryGrid)
    _DISPATCH_PATCHED = True


def _next_message_per_node(state, nodes: set[int]) -> list:
    """What ``state.get_message_ins(node_id, limit=1)`` returns for every node in ``nodes``, in one pass.

    Flower's loop asks per node, and each ask checks every stored message (delivered ones stay stored until their
    reply is pulled): with 1,000 users that was a million checks per pass, a pass at least every 100 ms, and a
    core kept busy while the users trained. Same checks (``_check_stored_messages``: expiry, federation), same
    order (the store's), same delivered-at stamp; only undelivered messages for these nodes are looked at.
    """
    from flwr.supercore.date import now

    taken: dict[int, object] = {}
    with state.lock:
        for msg_id, msg in list(state.message_ins_store.items()):
            node = msg.metadata.dst_node_id
            if msg.metadata.delivered_at != "" or node in taken or node not in nodes:
                continue
            state._check_stored_messages({msg_id})
            if state.message_ins_store.get(msg_id) is not None:
                taken[node] = msg
        stamp = now().isoformat()
        for msg in taken.values():
            msg.metadata.delivered_at = stamp
    return list(taken.values())


ENGINE_STOPPED = _threading.Event()  # set when run_simulation_engine's engine has ended


class SimulationEngineStopped(RuntimeError):
    """The simulation engine is gone: the ServerApp's grid calls fail at once instead of timing out."""


def _stop_grid_with_engine(grid_class) -> None:
    """Make the in-memory grid's calls raise once the simulation engine has ended (crashed or stopped).

    Flower 1.42 runs the ServerApp in a non-daemon thread and, when its engine dies (e.g. Ray cannot place an
    actor), leaves that thread waiting out its own timeouts (the provider's setup waits up to 600 s) in a process
    that cannot exit. With this, the ServerApp's next push, pull or node query raises and its thread ends.
    """
    for name in ("push_messages", "pull_messages", "get_node_ids"):
        original = getattr(grid_class, name)

        def checked(self, *args, _original=original, **kwargs):
            if ENGINE_STOPPED.is_set():
                raise SimulationEngineStopped("the simulation engine stopped")
            return _original(self, *args, **kwargs)

        setattr(grid_class, name, checked)


def run_simulation_engine(server_app, client_app, num_supernodes: int, backend_config: dict, context,
                          verbose: bool = False) -> None:
    """Flower's simulation engine with our ServerApp Context (``run_simulation`` cannot take one)."""
    check_flower_version()
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    ENGINE_STOPPED.clear()
    try:
        _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                        server_app=server_app, client_app=client_app, backend_name="ray",
                        backend_config=backend_config, server_app_context=context, verbose_logging=verbose)
    finally:
        ENGINE_STOPPED.set()  # the ServerApp thread (still running if the engine died) stops at its next grid call


# ------------------------------------------------------------------------------------- SuperNode, SuperExec


class _NodeTime:
    """The ``time`` module as seen by flwr's SuperNode loop: its fixed sleeps replaced by learned, short ones.

    Every pull of the SuperLink is a TLS request that costs the SuperLink ≈ 10 ms of CPU; at a fixed 50 ms two
    idle nodes kept 0.4 of a core busy (BENCHMARKS.md), taken from the provider's ψ pass that runs meanwhile.
    In split learning the next message comes a fairly constant time after our reply (the provider's ψ pass plus
    the slowest other user), so the node learns that gap and sleeps through most of it, then polls at 20 ms
    growing ×1.3 up to ``cap``. The reply poll (an in-memory lookup, cheap) stays at ``reply`` seconds.
    """

    def __init__(self, cap: float, reply: float, first: float = 0.02, growth: float = 1.3, lead: float = 0.7):
        self.cap, self.reply, self.first, self.growth, self.lead = cap, reply, first, growth, lead
        self.replied_at: float | None = None  # when our last reply went to the SuperLink
        self.gap: float | None = None  # smoothed time from our reply to the next message
        self.polls = 0

    def replied(self) -> None:
        self.replied_at, self.polls = _time.monotonic(), 0

    def received(self) -> None:
        if self.replied_at is not None:
            gap = _time.monotonic() - self.replied_at
            self.gap = gap if self.gap is None else 0.7 * self.gap + 0.3 * gap
        self.replied_at, self.polls = None, 0

    def idle_wait(self) -> float:
        """Seconds to sleep after a pull that found nothing."""
        self.polls += 1
        if self.replied_at is not None and self.gap is not None and self.polls == 1:
            ahead = self.lead * self.gap - (_time.monotonic() - self.replied_at)
            if ahead > self.first:
                return min(ahead, self.cap)
        return min(self.cap, self.first * self.growth ** (self.polls - 1))

    def sleep(self, seconds: float) -> None:
        if seconds >= 3:
            seconds = self.idle_wait()
        elif seconds >= 0.5:
            seconds = self.reply
        _time.sleep(seconds)

    def __getattr__(self, name):
        return getattr(_time, name)


def install_fast_polling(cap: float | None = None, reply: float = 0.01, heartbeat: float | None = None,
                         wake=None) -> _NodeTime:
    """Replace the SuperNode's fixed waits (runtime/supernode.py says why); ``wake()`` runs after each stored message.

    ``wake`` tells this node's SuperExec that a task is ready, so it need not poll for one every few ms.
    """
    check_flower_version()
    from flwr.supercore import heartbeat as heartbeat_module
    from flwr.supernode import fleet_http_connection, start_client_internal

    cap = float(os.environ.get("PPFLOWER_SUPERNODE_POLL", "0.5")) if cap is None else cap
    clock = _NodeTime(cap, reply)
    start_client_internal.time = clock
    pull, push = start_client_internal._pull_and_store_message, start_client_internal._push_messages

    def pull_and_store(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            clock.received()
            if wake is not None:
                wake()
        return run_id

    def push_messages(*args, **kwargs):
        try:
            return push(*args, **kwargs)
        finally:
            clock.replied()

    start_client_internal._pull_and_store_message = pull_and_store
    start_client_internal._push_messages = push_messages
    # Heartbeat every 10 s (Flower's minimum; default 30 s): a dead node is marked offline after 20 s instead of
    # 60 s, and only then may a restarted node with the same key activate again.
    heartbeat = float(os.environ.get("PPFLOWER_SUPERNODE_HEARTBEAT", "10")) if heartbeat is None else heartbeat
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    heartbeat_module.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    return clock


class _WakeTime:
    """The ``time`` module as seen by flwr's SuperExec loop: its task-poll sleep ends early when woken.

    The SuperNode writes a byte to a FIFO (in its private 0700 directory) whenever a message is ready, so a
    task is launched at once while idle polling stays slow (``cap``). Polling the SuperNode every 20 ms had
    cost 0.45 of a core on an idle node.
    """

    def __init__(self, fifo: str, cap: float):
        self.fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # RDWR: never sees EOF when the writer goes
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        import select

        if select.select([self.fd], [], [], self.cap)[0]:
            try:
                os.read(self.fd, 4096)
            except BlockingIOError:
                pass

    def __getattr__(self, name):
        return getattr(_time, name)


def install_woken_superexec(fifo: str, cap: float = 0.5) -> None:
    """In the SuperExec: poll for tasks when the SuperNode says one is ready, else every ``cap`` s."""
    check_flower_version()
    from flwr.supercore.superexec import run_superexec

    run_superexec.time = _WakeTime(fifo, cap)


def make_superexec_waker(directory: str):
    """In the SuperNode: a FIFO for its SuperExec (path) and the function that wakes it."""
    fifo = os.path.join(directory, "superexec.wake")
    os.mkfifo(fifo, 0o600)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)

    def wake() -> None:
        try:
            os.write(fd, b"\0")
        except BlockingIOError:  # the pipe is full of unread wake-ups: the SuperExec is awake anyway
            pass

    return fifo, wake


def install_fast_object_pulls(initial_backoff: float = 0.005, backoff_cap: float = 0.5,
                              give_up_after: float | None = None) -> None:
    """Retry an object that is not uploaded yet after milliseconds, not after a second.

    In flwr 1.42 a message and its objects (its arrays) travel separately: the receiver gets the message, then
    pulls each object, and an object the sender has not finished pushing raises ``ObjectUnavailableError``,
    retried after ``PULL_INITIAL_BACKOFF`` = 1 s (doubling up to 10 s). Split learning's messages are pulled
    the moment they exist, so each of the three pulling legs of a round (SuperNode ← SuperLink, ClientApp ←
    SuperNode, ServerApp ← SuperLink) often found its object a few ms early and slept a whole second
    (BENCHMARKS.md). Here the waits start at 5 ms and stay ≤ 0.5 s; the tries per object grow so that giving
    up on a sender that died mid-upload takes as long as before (500 tries × 10 s). Called in every process
    that pulls: ppflower-supernode, its ClientApp processes, the provider's ServerApp. ``give_up_after``
    (seconds) bounds that instead: the provider passes its step-timeout, so a user killed while uploading its
    reply costs one step-timeout, not 5,000 s of a round that never ends.
    """
    check_flower_version()
    from flwr.supercore import constant
    from flwr.supercore.inflatable import inflatable_utils

    tries = int(constant.PULL_MAX_TRIES_PER_OBJECT * constant.PULL_BACKOFF_CAP / backoff_cap)
    if give_up_after is not None:
        tries = max(1, int(give_up_after / backoff_cap))
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        fn.__kwdefaults__.update(initial_backoff=initial_backoff, backoff_cap=backoff_cap,
                                 max_tries_per_object=tries)


def install_fab_once() -> None:
    """Install each FAB once per node, not once per message.

    Flower 1.42's ClientApp process calls ``install_from_fab(fab bytes)`` for every message: it extracts the whole
    archive into a temporary directory, checks the hashes of its files against its own list, and then, finding the
    app already installed, returns the installed directory untouched (≈ 17 ms of a 2-core box's CPU on each
    message's critical path, BENCHMARKS.md). Here a successful install by Flower leaves an empty marker named by
    the SHA-256 of the FAB's bytes (``$FLWR_HOME/apps/.ppflower-installed/<sha256>``). The same bytes later return at
    once, but only while the directory Flower installs them to (``apps/<publisher>.<name>.<version>.<hash>``, from
    the FAB's own pyproject.toml, as Flower computes it) is still there. Byte-identical archives give the same
    extraction and the same verdict, and Flower itself trusts an existing install directory without re-checking
    it, so nothing is trusted that Flower did not already trust. Anything else goes to Flower's own install: a
    new FAB, a path, a removed directory, a marker or cache that cannot be read or written (a read-only FLWR_HOME
    just installs every time, as Flower does).
    """
    check_flower_version()
    import hashlib
    import io
    import tomllib
    import zipfile

    from flwr.common.config import get_metadata_from_config
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home
    from flwr.supernode.runtime import run_clientapp

    install = run_clientapp.install_from_fab
    if getattr(install, "_ppflower_once", False):
        return

    def installed_dir(fab_file: bytes, digest: str):
        """Flower's install directory of these bytes, if Flower installed them here and it still exists."""
        try:
            apps = get_flwr_home() / APP_DIR
            if not (apps / ".ppflower-installed" / digest).is_file():
                return None
            with zipfile.ZipFile(io.BytesIO(fab_file)) as archive:
                config = tomllib.loads(archive.read("pyproject.toml").decode())
            fab_id, version = get_metadata_from_config(config)
            publisher, name = fab_id.split("/")
            path = apps / f"{publisher}.{name}.{version}.{digest[:FAB_HASH_TRUNCATION]}"
            return path if path.is_dir() else None
        except Exception:  # noqa: BLE001 - a cache that cannot answer sends the FAB to Flower's own install
            return None

    def install_from_fab(fab_file, *args, **kwargs):
        if not isinstance(fab_file, bytes) or args or kwargs.get("install_dir") is not None:
            return install(fab_file, *args, **kwargs)
        digest = hashlib.sha256(fab_file).hexdigest()
        path = installed_dir(fab_file, digest)
        if path is not None:
            return path
        path = install(fab_file, *args, **kwargs)
        try:
            marker = get_flwr_home() / APP_DIR / ".ppflower-installed" / digest
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:  # no cache (e.g. a read-only FLWR_HOME): the next message installs again, as in Flower
            pass
        return path

    install_from_fab._ppflower_once = True
    run_clientapp.install_from_fab = install_from_fab


def use_superexec() -> None:
    """Start ``runtime.superexec`` (woken per task; ClientApp processes forked from a warm template) as the
    SuperExec."""
    check_flower_version()
    from flwr.supernode import start_client_internal

    def route(args: list[str]) -> list[str]:
        return [sys.executable, "-m", "runtime.superexec", *args[1:]] if args[0] == "flower-superexec" else args

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
