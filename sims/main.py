"""The Flower app: ``server_app`` (the provider) and ``client_app`` (a user). Wiring only — no maths here."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from pp_flower import protocol as P
from pp_flower.config import AppConfig
from pp_flower.user import User, reply_message
from strategies.provider import ProviderStrategy

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
        cfg = AppConfig.from_run_config(context.run_config)
        ProviderStrategy.from_config(cfg, message_log=message_log).run(grid)

    return app


server_app = make_server_app()

# ---------------------------------------------------------------------------------------------- a user

client_app = ClientApp()


@client_app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    route_logs_to_flower()
    info = User.setup(context, msg)
    step = info.pop("step")  # > 0 when a restarted user resumed from its resume point
    return Message(content=P.make_content(control={"step": step, "batch": P.NONE}, metrics=info), reply_to=msg)


@client_app.train("step")
def step(msg: Message, context: Context) -> Message:
    return reply_message(msg, User(context).step(msg))


@client_app.evaluate("chunk")
def evaluate(msg: Message, context: Context) -> Message:
    return reply_message(msg, User(context).evaluate(msg))
