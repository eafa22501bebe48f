"""The Flower app: ``server_app`` (the provider) and ``client_app`` (a user). Wiring only — no maths here."""

from __future__ import annotations

import secrets

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pp_flower import protocol
from sims.capacity import check_capacity  # flower-simulation's hook: do the users fit in this machine's memory?
from sims.user_trainers import create_pool as start_trainers  # flower-simulation's hook: trainers before the run
from sims.user_trainers import trainer_for

# what runtime/flower_simulation.py and the tests take from this app module; the hooks are looked up by name
__all__ = ["absolute_paths", "check_capacity", "client_app", "make_server_app", "prepare_run_config", "report_run",
           "server_app", "start_trainers"]

def route_logs_to_flower() -> None:
    """Send pp_flower's log records through Flower's logger, so `flwr run --stream` and SuperNode logs show them."""
    import logging

    ours, flower = logging.getLogger("pp_flower"), logging.getLogger("flwr")
    ours.setLevel(logging.INFO)
    for handler in flower.handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = not flower.handlers


# ---------------------------------------------------------------------------------------- the provider


def make_server_app(message_log=None) -> ServerApp:
    """A ServerApp running the provider strategy; ``message_log(direction, message)`` sees every message."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        route_logs_to_flower()
        from pp_flower.config import AppConfig
        from runtime.flower_patches import install_fast_object_pulls
        from strategies.provider import ProviderStrategy  # the provider's torch stack: never in a user's process

        from runtime.runlock import lock_dir, unlock_dir

        # relative paths mean this process's directory (`flwr run .`: where the SuperLink was started), and users
        # get them absolute in their setup message, wherever their processes run
        cfg = AppConfig.from_run_config(absolute_paths(dict(context.run_config)))
        # deployment: users' replies are pulled from the SuperLink without 1 s waits, and a reply whose sender died
        # mid-upload is given up after one step-timeout (Flower's default retries for 5,000 s)
        install_fast_object_pulls(give_up_after=cfg.step_timeout)
        lock = lock_dir(cfg.run_dir, "run-dir")  # one run per run dir (re-entrant: flower-simulation holds it too)
        try:
            ProviderStrategy.from_config(cfg, message_log=message_log).start(grid)
        finally:
            unlock_dir(lock)

    return app


server_app = make_server_app()


def absolute_paths(run_config: dict, from_env: bool = False) -> dict:
    """``run_config`` with its paths (PATH_KEYS) made absolute against this process's directory; ``from_env``:
    an empty data-dir / vgg-weights becomes what PPFLOWER_DATA_DIR / PPFLOWER_VGG_WEIGHTS name here."""
    import os
    from pathlib import Path

    from pp_flower.config import PATH_KEYS

    out = dict(run_config)
    if from_env:
        for key, var in (("data-dir", "PPFLOWER_DATA_DIR"), ("vgg-weights", "PPFLOWER_VGG_WEIGHTS")):
            if not str(out.get(key, "") or "") and os.environ.get(var):
                out[key] = os.environ[var]
    for key in PATH_KEYS:
        if str(out.get(key, "") or ""):
            out[key] = str(Path(str(out[key])).expanduser().resolve())
    return out


def prepare_run_config(overrides: dict) -> dict:
    """The full run config (defaults + ``overrides``), checked before any round starts (``flower-simulation``).

    Paths are resolved here, in the driver, and travel with the run: users on the machines of a Ray cluster (whose
    workers have the head's environment and directory) read the data set and φ's weights the driver names."""
    from pp_flower.config import AppConfig, preflight

    cfg = AppConfig.from_run_config(absolute_paths(AppConfig.from_run_config(overrides).to_run_config(),
                                                   from_env=True))
    preflight(cfg)  # a missing ψ, data set or φ, a class mismatch or an image size the U-Net can't take
    return cfg.to_run_config()


def report_run(run_config: dict, log) -> dict:
    """Each user's result from ``run.json``; a run whose users failed or ended with NaN metrics is an error."""
    import json
    import math
    from pathlib import Path

    from pp_flower.errors import PPFlowerError

    summary = Path(run_config["run-dir"]) / "run.json"
    if not summary.exists():
        raise PPFlowerError(f"The run ended without writing {summary}; see the log above.")
    users = json.loads(summary.read_text())["users"]
    failed = []
    for u in users:
        accuracy = u.get("test", {}).get("test-accuracy", float("nan"))
        psnr = u.get("test", {}).get("protected-psnr", float("nan"))
        log(f"user {u['index']}: test accuracy {accuracy:.4f}, protected PSNR {psnr:.2f} dB (median)")
        if not (math.isfinite(accuracy) and math.isfinite(psnr)):
            failed.append(str(u["index"]))
    if failed:
        raise PPFlowerError(f"User(s) {', '.join(failed)} of {len(users)} ended without finite test metrics "
                            f"(failed or dropped; see the log above and {summary}).")
    return {"users": users}

# ---------------------------------------------------------------------------------------------- a user
#
# A user's state lives in its trainer (pp_flower.user.UserTrainer, placed by sims.user_trainers); the ClientApp,
# which Flower runs afresh for every message, only relays. context.state keeps what finds the user again.

client_app = ClientApp()
S_USER = "pp.user"  # context.state: {"key": the user's secret, "index": its user index, "trainer": where it lives}
NODE_KEYS = ("data-dir", "vgg-weights", "user-device", "num-threads")  # a user's own machine may override these


@client_app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Hand the provider's config and sample ids to a fresh live user (``resume``: from its resume point)."""
    route_logs_to_flower()
    meta = dict(msg.content.config_records[protocol.CONFIG])
    resume = bool(int(meta.pop("resume", 0)))
    for key in NODE_KEYS:
        if key in context.node_config:
            meta[key] = context.node_config[key]
    meta["out-dir"] = str(context.node_config.get("out-dir", meta["out-dir"]))
    trainer, where = trainer_for(context)
    key = secrets.token_hex(16)
    info = trainer.setup(key, meta, protocol.get_arrays(msg.content, protocol.IDS), resume)
    context.state[S_USER] = ConfigRecord({"key": key, "index": int(meta["user-index"]), "trainer": where})
    step = info.pop("step")  # > 0 when a restarted user resumed from its resume point
    content = protocol.make_content(control={"step": step, "batch": protocol.NO_INDEX}, metrics=info)
    return Message(content=content, reply_to=msg)


def relay(msg: Message, context: Context, kind: str) -> Message:
    """One message to the user's trainer and its reply back: x̂, ids, counters and metrics only."""
    if S_USER not in context.state.config_records:
        raise RuntimeError(f"{protocol.NOT_SET_UP} (no query.setup message received; a restarted SuperNode?)")
    user = context.state.config_records[S_USER]
    trainer, _ = trainer_for(context, str(user["trainer"]))
    arrays = {k: protocol.get_arrays(msg.content, k) for k in (protocol.GRAD, protocol.RESULT, protocol.WEIGHTS)
              if k in msg.content.array_records}
    control = dict(msg.content.config_records[protocol.CONTROL])
    reply = trainer.call(str(user["key"]), int(user["index"]), kind, control, arrays)
    return reply_message(msg, reply)


def reply_message(msg: Message, reply: dict) -> Message:
    """Turn a trainer's reply into the reply Message (the only way user data leaves the user)."""
    content = protocol.make_content(control=reply.get("control"), metrics=reply.get("metrics"),
                             **{protocol.PROTECTED: reply.get("protected"), protocol.WEIGHTS: reply.get("weights")})
    return Message(content=content, reply_to=msg)


@client_app.train("step")
def step(msg: Message, context: Context) -> Message:
    return relay(msg, context, "step")


@client_app.evaluate("chunk")
def evaluate(msg: Message, context: Context) -> Message:
    return relay(msg, context, "evaluate")
