"""``flower-simulation``: the command Flower 1.42 no longer ships, as a thin wrapper over its simulation engine.

    flower-simulation --app sims.main --num-supernodes 4 --run-config "alpha=0.005 epochs=1"

``--app MODULE`` names a module with ``server_app`` and ``client_app`` (``MODULE:server,client`` picks
other names). The run config is the app's defaults (pp_flower.config.AppConfig, mirrored in pyproject's
``[tool.flwr.app.config]``) overridden by ``--run-config``, and reaches the ServerApp's context.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Optional

import typer
from rich.console import Console

from pp_flower.errors import PPFlowerError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


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
    ray.init(address=ray_address, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})


def simulate(server_app, client_app, num_supernodes: int, run_config: dict, num_cpus: float = 1.0,
             num_gpus: float = 0.0, ray_address: str | None = None, verbose: bool = False,
             users_per_trainer: int = 0) -> None:
    """Run ``server_app`` + ``num_supernodes`` × ``client_app`` on Flower's Ray simulation engine.

    The users' live trainers (sims.user_trainers) are Ray actors made here, before the run: on GPU shares of
    ``num_gpus`` each when given, else one per ``num_cpus`` cores. Flower's own workers only relay messages, so
    they hold the CPUs and no GPU.
    """
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

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
    _run_simulation(num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                    server_app=server_app, client_app=client_app, backend_name="ray",
                    backend_config=backend_config, server_app_context=context, verbose_logging=verbose)


def load_app(spec: str):
    module_name, _, names = spec.partition(":")
    server_name, _, client_name = (names or "server_app,client_app").partition(",")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PPFlowerError(f"Cannot import app module '{module_name}': {exc}") from exc
    try:
        return getattr(module, server_name), getattr(module, client_name)
    except AttributeError as exc:
        raise PPFlowerError(f"'{module_name}' lacks {server_name} or {client_name}: {exc}") from exc


def cli(
    app: str = typer.Option("sims.main", "--app", help="Module with server_app and client_app."),
    num_supernodes: int = typer.Option(2, "--num-supernodes", help="Number of simulated users."),
    run_config: str = typer.Option("", "--run-config", help='Overrides in Flower\'s grammar (strings quoted), e.g. '
                                   '\'classifier="runs/classifier/best.pt" alpha=0.005\', or a .toml file; keys and '
                                   'defaults: pyproject.toml [tool.flwr.app.config] (README).'),
    num_cpus: float = typer.Option(1.0, "--num-cpus", help="CPU cores reserved per user (Ray resources)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPU fraction per user, e.g. 0.25."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", envvar="RAY_ADDRESS",
                                              help="Attach to an existing Ray cluster (e.g. 'auto')."),
    verbose: bool = typer.Option(False, "--verbose"),
) -> None:
    """Run the pp-flower app (or any Flower app module) on Flower's simulation engine."""
    from pp_flower.config import AppConfig, parse_run_config

    if num_supernodes < 1:
        raise PPFlowerError(f"--num-supernodes must be at least 1, got {num_supernodes}.")
    overrides = parse_run_config(run_config)
    cfg = AppConfig.from_run_config(overrides)
    server_app, client_app = load_app(app)
    if app.split(":")[0] == "sims.main":
        from strategies.provider import preflight

        preflight(cfg)  # a missing ψ, data set or φ ends here, before any round starts
    console.print(f"[bold]flower-simulation[/] {app}: {num_supernodes} users, run dir {cfg.run_dir}")
    simulate(server_app, client_app, num_supernodes, cfg.to_run_config(), num_cpus, num_gpus, ray_address, verbose)
    summary = os.path.join(cfg.run_dir, "run.json")
    if not os.path.exists(summary):
        raise PPFlowerError(f"The simulation ended without writing {summary}; see the log above.")
    users = json.load(open(summary))["users"]
    for u in users:
        test = u["test"]
        console.print(f"user {u['index']}: test accuracy {test.get('test-accuracy', float('nan')):.4f}, "
                      f"protected PSNR {test.get('protected-psnr', float('nan')):.2f} dB")


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(cli)
    try:
        app()
    except PPFlowerError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
