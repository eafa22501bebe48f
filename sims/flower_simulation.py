"""``flower-simulation``: the command Flower 1.42 no longer ships, as a thin wrapper over its simulation engine.

    flower-simulation --app sims.main --num-supernodes 4 --run-config "alpha=0.005 epochs=1"

``--app MODULE`` names a module with ``server_app`` and ``client_app`` (``MODULE:server,client`` picks
other names). The run config is the app's defaults (pp_flower.config.AppConfig, mirrored in pyproject's
``[tool.flwr.app.config]``) overridden by ``--run-config``, and reaches the ServerApp's context.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import typer
from rich.console import Console

from pp_flower.config import AppConfig
from pp_flower.errors import PPFlowerError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def start_ray(ray_address: str | None = None) -> None:
    """``ray.init`` as Flower's Ray backend does it (workers see this process's sys.path), unless already up."""
    import sys

    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if not sys.stderr.isatty():  # piped or logged: no ANSI colour codes, neither Ray's prefixes nor the workers' lines
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
        runtime_env["worker_process_setup_hook"] = "sims.flower_patches.plain_logs_when_piped"
    ray.init(address=ray_address, include_dashboard=False, runtime_env=runtime_env)


def simulate(server_app, client_app, num_supernodes: int, run_config: dict, num_cpus: float = 1.0,
             num_gpus: float = 0.0, ray_address: str | None = None, verbose: bool = False,
             users_per_trainer: int = 0) -> None:
    """Run ``server_app`` + ``num_supernodes`` × ``client_app`` on Flower's Ray simulation engine.

    The users' live trainers (sims.user_trainers) are Ray actors made here, before the run: on GPU shares of
    ``num_gpus`` each when given, else one per ``num_cpus`` cores. Flower's own workers only relay messages, so
    they hold the CPUs and no GPU.
    """
    from flwr.app import Context, RecordDict

    from sims.flower_patches import install_event_driven_dispatch, run_simulation_engine
    from sims.user_trainers import create_pool

    install_event_driven_dispatch()
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # keep Ray's GPU env handling quiet
    start_ray(ray_address)
    import ray

    trainers = create_pool(num_supernodes, num_cpus, num_gpus, users_per_trainer)
    # as many relay workers as trainers: more would add processes, not parallelism (a trainer serialises its users)
    relay_cpus = max(num_cpus, ray.cluster_resources().get("CPU", 1) / len(trainers))
    backend_config = {"client_resources": {"num_cpus": relay_cpus, "num_gpus": 0.0}}
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    import signal
    import threading

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, _quiet_interrupt) if in_main else None
    try:
        run_simulation_engine(server_app, client_app, num_supernodes, backend_config, context, verbose)
    except KeyboardInterrupt:
        stop_on_interrupt(run_config.get("run-dir"))
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def _quiet_logs() -> None:
    import logging

    for name in ("flwr", "pp_flower"):  # Flower's threads are still running: their errors about the actors
        logging.getLogger(name).disabled = True  # being stopped now are expected, not news


def _quiet_interrupt(signum, frame) -> None:
    """Ctrl-C: silence the logs at once (Ray's workers got the same signal), then interrupt as Python does."""
    _quiet_logs()
    raise KeyboardInterrupt


def stop_on_interrupt(run_dir: str | None) -> None:
    """Ctrl-C: stop Ray's workers and end the process now, with one line saying how to resume (exit 130).

    Flower's ServerApp runs in a non-daemon thread that nothing can stop from outside, so the process would
    otherwise wait for the provider's loop to finish. Every resume point on disk was written atomically, so
    the run directory is resumable from its last one.
    """
    import sys

    import ray

    _quiet_logs()
    try:
        ray.shutdown()
    finally:
        where = f" (resume points in {run_dir})" if run_dir else ""
        print(f"interrupted — rerun the same command to resume{where}.", file=sys.stderr, flush=True)
        sys.stdout.flush()
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
                                   'section tool.flwr.app.config; meanings: README, section flower-simulation.'),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="CPU cores reserved per user (Ray resources)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPU fraction per user, e.g. 0.25."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="Attach to an existing Ray cluster (e.g. 'auto')."),
    verbose: bool = typer.Option(False, "--verbose"),
) -> None:
    """Run the pp-flower app (or any Flower app module) on Flower's simulation engine.

    An app module may define ``prepare_run_config(overrides) -> dict`` (its full, checked run config) and
    ``report_run(run_config, log)`` (its results; raising when they are unusable): sims.main does both.
    Ctrl-C stops the run and Ray's workers within seconds (exit 130); rerun the same command to resume."""
    from pp_flower.config import parse_run_config

    if num_supernodes < 1:
        raise PPFlowerError(f"--num-supernodes must be at least 1, got {num_supernodes}.")
    overrides = parse_run_config(run_config)
    module, server_app, client_app = load_app(app)
    prepare = getattr(module, "prepare_run_config", None)
    config = prepare(overrides) if prepare else overrides
    console.print(f"[bold]flower-simulation[/] {app}: {num_supernodes} users"
                  + (f", run dir {config['run-dir']}" if "run-dir" in config else ""))
    simulate(server_app, client_app, num_supernodes, config, num_cpus, num_gpus, ray_address, verbose)
    if (report := getattr(module, "report_run", None)) is not None:
        report(config, console.print)


def main() -> None:
    from sims.flower_patches import plain_logs_when_piped

    plain_logs_when_piped()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(cli)
    try:
        app()
    except PPFlowerError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
