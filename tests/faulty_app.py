"""A ClientApp for fault tests: the real user, except that user 1 raises once at step 2 and user 0 sends a
NaN-poisoned x̂ once at step 1. Markers on disk make each fault happen exactly once (a raising ClientApp's
context.state is not saved, so it cannot remember)."""

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pp_flower import protocol as P
from pp_flower.user import S_CONFIG, User, reply_message
from sims import main as real

app = ClientApp()
app.query("setup")(real.setup)
app.evaluate("chunk")(real.evaluate)


def _once(context: Context, name: str) -> bool:
    marker = Path(str(context.state.config_records[S_CONFIG]["out-dir"])) / f"fault-{name}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


@app.train("step")
def step(msg: Message, context: Context) -> Message:
    user = User(context)
    want = int(msg.content.config_records[P.CONTROL]["want"])
    if user.index == 1 and want == 2 and _once(context, "raise"):
        raise RuntimeError("injected failure")
    reply = user.step(msg)
    if user.index == 0 and reply["control"]["batch"] == 1 and _once(context, "nan"):
        reply["protected"]["xhat"][0, 0, 0, 0] = float("nan")
    return reply_message(msg, reply)
