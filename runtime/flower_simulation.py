"""``flower-simulation``: the command Flower 1.42 no longer ships, as a thin wrapper over its simulation engine.

    flower-simulation --app sims.main --num-supernodes 4 --run-config "alpha=0.005 epochs=1"

``--app MODULE`` names a module with ``server_app`` and ``client_app`` (``MODULE:server,client`` picks
other names). The run config is the app's defaults (pp_flower.config.AppConfig, mirrored in pyproject's
``[tool.flwr.app.config]``) overridden by ``--run-config``, and reaches the ServerApp's context.

Like Flower, this runner imports no app: it loads ``--app`` by name and asks the module for optional hooks,
``prepare_run_config`` (the full, checked run config), ``check_capacity`` (whether the users fit in this machine's
memory, before Ray starts), ``start_trainers`` (the app's own Ray actors, made before the run) and ``report_run``
(its results). sims.main provides all four.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import typer
from rich.console import Console

from pp_flower.config import AppConfig
from pp_flower.errors import PPFlowerError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_resources(num_cpus: float, num_gpus: float, ray_address: str | None) -> None:
    """What each user asks of Ray must be possible, checked before Ray starts (a local Ray gets this machine).

    Flower's relay workers ask ``num_cpus`` each and a trainer ``num_gpus``: more than one machine has left Ray's
    actor pool empty and the run hanging ("ActorPool is empty")."""
    import math

    if not (math.isfinite(num_cpus) and num_cpus > 0):
        raise PPFlowerError(f"--num-cpus must be a number of cores > 0 per user, got {num_cpus:g}.")
    if not (math.isfinite(num_gpus) and num_gpus >= 0):
        raise PPFlowerError(f"--num-gpus must be a GPU share ≥ 0 per user (e.g. 0.25), got {num_gpus:g}.")
    if ray_address is not None:
        return  # a cluster's nodes are checked once attached (check_cluster)
    cores = machine_cores()
    if num_cpus > cores:
        raise PPFlowerError(f"--num-cpus {num_cpus:g} per user, but this machine has {cores} CPU core(s) for Ray; "
                            f"use --num-cpus {cores} or less (or --ray-address a cluster with larger machines).")
    if num_gpus > 0:
        gpus = _local_gpus()
        if num_gpus > gpus:
            raise PPFlowerError(f"--num-gpus {num_gpus:g} per user, but this machine has {gpus} GPU(s) visible; "
                                + ("drop --num-gpus to train users on CPUs." if gpus == 0 else
                                   f"use --num-gpus {gpus} or less (e.g. 0.25: four users a GPU)."))


def _local_gpus() -> int:
    """GPUs a local Ray would see (CUDA_VISIBLE_DEVICES honoured), via torch when it is installed."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def check_cluster(num_cpus: float, num_gpus: float) -> float:
    """Attached (or started) Ray: some node must hold one user's ``num_cpus`` and ``num_gpus``; returns the largest
    node's CPU count."""
    import ray

    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive", True)]
    nodes = [r for r in nodes if r] or [ray.cluster_resources()]
    cpus = max(r.get("CPU", 0) for r in nodes)
    gpus = max(r.get("GPU", 0) for r in nodes)
    if num_cpus > cpus:
        raise PPFlowerError(f"--num-cpus {num_cpus:g} per user, but the largest node of the Ray cluster has {cpus:g} "
                            f"CPU(s); use --num-cpus {cpus:g} or less.")
    if num_gpus > gpus:
        raise PPFlowerError(f"--num-gpus {num_gpus:g} per user, but the largest node of the Ray cluster has {gpus:g} "
                            "GPU(s); " + ("drop --num-gpus to train users on CPUs." if gpus == 0 else
                                          f"use --num-gpus {gpus:g} or less."))
    return cpus


def check_ray_address(address: str | None, source: str = "--ray-address") -> str | None:
    """None (start a Ray of this run's own) or a Ray address that answers now; anything else is one line.

    ``ray.init`` would retry an unreachable address for minutes (ignoring SIGTERM meanwhile) and print a raw
    ConnectionError for ``auto`` without a cluster. ``auto`` means the cluster last started with ``ray start`` on
    this machine (Ray's address file), never some other process's Ray found by scanning the process list."""
    import socket

    if address is None or not address.strip():
        return None
    address = address.strip()
    if address == "local":
        return None
    target = address
    if address == "auto":
        try:
            from ray._private.utils import read_ray_address

            target = read_ray_address()
        except Exception:  # noqa: BLE001 - Ray's private helper moved: treat as "no cluster found"
            target = None
        if not target:
            raise PPFlowerError(f"{source} auto: no Ray cluster started with `ray start` runs on this machine; start "
                                "one (`ray start --head`) or leave the address out to let the run start its own Ray.")
    hostport = target.split("://", 1)[1] if "://" in target else target
    host, sep, port = hostport.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise PPFlowerError(f"{source} {address!r} is not a Ray address; give HOST:PORT (e.g. 127.0.0.1:6379), "
                            "ray://HOST:PORT or auto.")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        found = f" (found by auto: {target})" if address == "auto" else ""
        raise PPFlowerError(f"Ray at {address}{found}, from {source}, is not reachable: {reason}; start the cluster "
                            f"(`ray start --head --port {port}`) or fix {source}.") from None
    if "://" not in target:  # something listens there: it must be a Ray head's GCS, not another service
        problem = _gcs_problem(f"{host}:{port}")
        if problem:
            raise PPFlowerError(f"{target} ({source}) answers, but not as a Ray cluster's head ({problem}); give the "
                                "address `ray start --head` printed (its GCS port, 6379 by default).")
    return target


def _gcs_problem(address: str, timeout: float = 15.0) -> str:
    """'' when ``address`` answers as a Ray GCS within ``timeout`` seconds, else what went wrong (Ray's C++ client
    logs to stderr meanwhile: silenced, so the refusal stays one line)."""
    import threading

    result: dict = {}

    def probe() -> None:
        try:
            from ray._raylet import GcsClient

            client = GcsClient(address=address)
            client.internal_kv_get(b"ppflower-probe", None, timeout=timeout)
            result["ok"] = True
        except Exception as exc:  # noqa: BLE001 - any failure means: not a Ray head we can use
            result["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    if result.get("ok"):
        return ""
    return result.get("error") or f"no answer within {timeout:g} s"


def start_ray(ray_address: str | None = None) -> None:
    """``ray.init`` as Flower's Ray backend does it (workers see this process's sys.path), unless already up.

    ``ray_address`` None starts a Ray of this process's own (never another process's cluster found on the
    machine); give an address checked by :func:`check_ray_address`."""
    import sys

    import ray

    if ray.is_initialized():
        return
    os.environ.pop("RAY_ADDRESS", None)  # ray.init would prefer it over the address checked and given here
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if not sys.stderr.isatty():  # piped or logged: no ANSI colour codes, neither Ray's prefixes nor the workers' lines
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        runtime_env["worker_process_setup_hook"] = "runtime.flower_patches.plain_logs_when_piped"
    try:
        ray.init(address=ray_address or "local", include_dashboard=False, runtime_env=runtime_env)
    except ConnectionError as exc:  # e.g. the cluster went away between the check and here
        raise PPFlowerError(f"Cannot attach to Ray at {ray_address}: {str(exc).splitlines()[0]}") from None


def simulate(server_app, client_app, num_supernodes: int, run_config: dict, num_cpus: float = 1.0,
             num_gpus: float = 0.0, ray_address: str | None = None, verbose: bool = False,
             users_per_trainer: int = 0, start_trainers=None) -> None:
    """Run ``server_app`` + ``num_supernodes`` × ``client_app`` on Flower's Ray simulation engine.

    ``start_trainers(num_supernodes, num_cpus, num_gpus, users_per_trainer) -> names``, the app module's optional
    hook, makes the app's own Ray actors once Ray is up and before the run (sims.main's: the users' live trainers,
    on GPU shares of ``num_gpus`` each when given, else one per ``num_cpus`` cores). Flower's own workers then
    only relay messages, so they hold the CPUs and no GPU; as many are placed as the hook made actors (without a
    hook: one per user).
    """
    from flwr.app import Context, RecordDict

    from runtime.flower_patches import install_event_driven_dispatch, run_simulation_engine

    install_event_driven_dispatch()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # keep Ray's GPU env handling quiet
    start_ray(ray_address)
    import ray

    node_cpus = check_cluster(num_cpus, num_gpus)
    trainers = start_trainers(num_supernodes, num_cpus, num_gpus, users_per_trainer) if start_trainers else []
    # as many relay workers as trainers: more would add processes, not parallelism (a trainer serialises its users);
    # never more than one node has, or no relay worker could be placed
    workers = len(trainers) or num_supernodes
    relay_cpus = max(num_cpus, min(node_cpus, ray.cluster_resources().get("CPU", 1) / workers))
    backend_config = {"client_resources": {"num_cpus": relay_cpus, "num_gpus": 0.0}}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    import signal
    import threading

    from runtime import signals

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in signals.SIGNALS} if in_main else {}
    signals.install(on_first=_quiet_logs)  # Ctrl-C, SIGTERM, SIGHUP: silence the logs at once, then interrupt
    release_openmp_threads()  # the ServerApp thread runs ψ: it must be this process's only OpenMP team
    try:
        run_simulation_engine(server_app, client_app, num_supernodes, backend_config, context, verbose)
    except KeyboardInterrupt:
        stop_on_interrupt(run_config.get("run-dir"))
    except PPFlowerError:
        raise
    except Exception as exc:  # the engine died (or the ServerApp failed): one line, not Flower's traceback
        cause = exc.__cause__ or exc
        lines = [line for line in str(cause).splitlines() if line.strip()] or [type(cause).__name__]
        raise PPFlowerError(f"The simulation stopped: {lines[0]}{' (see the log above)' if verbose else ''}") from exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def release_openmp_threads() -> None:
    """Release the main thread's OpenMP worker threads (``omp_pause_resource_all``, OpenMP 5.0), before Flower
    starts the ServerApp in a thread of its own.

    Flower runs the ServerApp, and so the provider's ψ, in a second thread. GNU OpenMP (torch's on Linux) gives
    that thread a team of its own; while the main thread's team (made by the checks and loading before the run)
    still exists, there are more OpenMP threads than cores, and GNU OpenMP then lets idle workers sleep at once
    instead of spinning, so every parallel region pays a wake-up: ψ's step at batch 16 took 43 ms there against
    23 ms on the main thread (2 cores). The main thread runs no torch after this point, and a team is remade on
    demand if it does. torch without GNU OpenMP (macOS, other builds): nothing to release, nothing done.
    """
    import ctypes
    import glob

    import torch

    libs = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))
    if libs:
        ctypes.CDLL(libs[0]).omp_pause_resource_all(1)  # omp_pause_soft: threads go, settings stay


def _quiet_logs() -> None:
    import logging

    for name in ("flwr", "pp_flower"):  # Flower's threads are still running: their errors about the actors
        logging.getLogger(name).disabled = True  # being stopped now are expected, not news


def stop_on_interrupt(run_dir: str | None) -> None:
    """Ctrl-C: stop Ray's workers and end the process now, with one line saying how to resume (exit 130).

    Flower's ServerApp runs in a non-daemon thread that nothing can stop from outside, so the process would
    otherwise wait for the provider's loop to finish. Every resume point on disk was written atomically, so
    the run directory is resumable from its last one.
    """
    import ray

    from runtime.signals import print_resume_line

    _quiet_logs()
    try:
        ray.shutdown()
    finally:
        try:
            print_resume_line(f"resume points in {run_dir}" if run_dir else "")
        finally:  # never skipped: Flower's worker threads, blocked on the stopped Ray, would hold exit forever
            os._exit(130)


def load_app(spec: str):
    """(module, server_app, client_app) of ``MODULE[:server,client]``."""
    module_name, _, names = spec.partition(":")
    server_name, _, client_name = (names or "server_app,client_app").partition(",")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PPFlowerError(f"Cannot import app module '{module_name}': {exc}") from exc
    try:
        return module, getattr(module, server_name), getattr(module, client_name)
    except AttributeError as exc:
        raise PPFlowerError(f"'{module_name}' lacks {server_name} or {client_name}: {exc}") from exc


def cli(
    app: str = typer.Option("sims.main", "--app", help="Module with server_app and client_app (MODULE:server,client "
                                                       "picks other names)."),
    num_supernodes: int = typer.Option(2, "--num-supernodes", help="Number of simulated users."),
    run_config: str = typer.Option("", "--run-config", help='Overrides in Flower\'s grammar (strings quoted), e.g. '
                                   '\'classifier="runs/classifier/best.pt" alpha=0.005\', or a .toml file of them. '
                                   f'Keys: {", ".join(AppConfig.keys())}. Defaults: pyproject.toml '
                                   'section tool.flwr.app.config; meanings: README, section Configuration.'),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="CPU cores reserved per user (Ray resources)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPU fraction per user, e.g. 0.25."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="Attach to an existing Ray cluster (e.g. 'auto')."),
    verbose: bool = typer.Option(False, "--verbose"),
) -> None:
    """Run the pp-flower app (or any Flower app module) on Flower's simulation engine.

    An app module may define ``prepare_run_config(overrides) -> dict`` (its full, checked run config),
    ``start_trainers(num_supernodes, num_cpus, num_gpus, users_per_trainer)`` (its own Ray actors, made before
    the run) and ``report_run(run_config, log)`` (its results; raising when they are unusable): sims.main does
    all three.
    Ctrl-C stops the run and Ray's workers within seconds (exit 130); rerun the same command to resume."""
    from pp_flower.config import parse_run_config
    from runtime.runlock import lock_dir

    if num_supernodes < 1:
        raise PPFlowerError(f"--num-supernodes must be at least 1, got {num_supernodes}.")
    source = "--ray-address" if "--ray-address" in " ".join(sys.argv) else "RAY_ADDRESS"
    ray_address = check_ray_address(ray_address, source)  # before anything slow: seconds, not Ray's minutes
    check_resources(num_cpus, num_gpus, ray_address)
    overrides = parse_run_config(run_config)
    module, server_app, client_app = load_app(app)
    capacity = getattr(module, "check_capacity", None)
    if capacity is not None and ray_address is None:  # a local Ray gets this machine: the users must fit in it
        capacity(overrides, num_supernodes)  # before prepare, which makes the run dir as its last check
    prepare = getattr(module, "prepare_run_config", None)
    config = prepare(overrides) if prepare else overrides
    if config.get("run-dir"):  # one run per run dir: a second run would mix its outputs (and run.json) in
        lock_dir(config["run-dir"], "run dir")
    console.print(f"[bold]flower-simulation[/] {app}: {num_supernodes} users"
                  + (f", run dir {config['run-dir']}" if "run-dir" in config else ""))
    simulate(server_app, client_app, num_supernodes, config, num_cpus, num_gpus, ray_address, verbose,
             start_trainers=getattr(module, "start_trainers", None))
    if (report := getattr(module, "report_run", None)) is not None:
        report(config, console.print)


def main() -> None:
    from runtime import signals
    from runtime.flower_patches import plain_logs_when_piped

    signals.install(on_first=_quiet_logs)  # SIGTERM and SIGHUP stop the run as Ctrl-C does, at every stage
    plain_logs_when_piped()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(cli)
    try:
        app()
    except PPFlowerError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        signals.print_resume_line()
        raise SystemExit(130) from None
    except SystemExit as exc:
        if exc.code == 130 and signals.interrupted():  # typer's silent Exit(130) for an interrupt
            signals.print_resume_line()
        raise


if __name__ == "__main__":
    main()
