"""A ClientApp for fault tests: the real user, except that user 1 raises once at step 2 and user 0 sends a
NaN-poisoned x̂ once at step 1. Markers in the run directory make each fault happen exactly once."""

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pp_flower import protocol
from sims import main as real

MARKER_DIR = ""  # set by the test; the module travels to Ray workers by value, this value with it
app = ClientApp()
app.query("setup")(real.setup)
app.evaluate("chunk")(real.evaluate)


def _once(context: Context, name: str) -> bool:
    marker = Path(MARKER_DIR) / f"fault-{name}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


@app.train("step")
def step(msg: Message, context: Context) -> Message:
    index = int(context.state.config_records[real.S_USER]["index"])
    want = int(msg.content.config_records[protocol.CONTROL]["want"])
    if index == 1 and want == 2 and _once(context, "raise"):
        raise RuntimeError("injected failure")
    reply = real.relay(msg, context, "step")
    if index == 0 and reply.content.config_records[protocol.CONTROL]["batch"] == 1 and _once(context, "nan"):
        record = reply.content.array_records[protocol.PROTECTED]
        xhat = record["xhat"].numpy().copy()
        xhat[0, 0, 0, 0] = float("nan")
        record["xhat"] = protocol.tensor_array(xhat)
    return reply
