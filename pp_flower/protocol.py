"""The provider ↔ user protocol in one place: message types, record keys, (de)serialisation, validation.

See docs/protocol.md for the full description. Privacy invariants (enforced by construction here and
checked on real message contents in tests/test_flower_app.py::test_privacy_audit_on_every_message):

* user → provider messages carry only protected images x̂ = h_θ(x) (as 8-bit images under the default
  ``wire=uint8``), sample ids, step counters, scalar
  losses and (with ``aggregate=fedavg``) h_θ's public weights — never a plain image and never a label;
* provider → user messages carry only ∂L_class/∂x̂, per-sample losses / right-or-wrong flags of the user's own
  protected images, configuration, sample ids and (fedavg) averaged h_θ weights — never a ψ parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

if TYPE_CHECKING:  # torch is imported where tensors are made, so a relaying ClientApp never loads it
    import torch

# Message types ("<category>.<action>", as Flower's ClientApp routes them)
SETUP = "query.setup"          # provider → user: config + the sample ids handed to this user
STEP = "train.step"            # provider → user: ∂L_class/∂x̂ of the last batch; user → provider: next x̂
EVAL = "evaluate.chunk"        # provider → user: per-sample results of the last chunk; user → provider: next x̂

# Record keys
CONFIG = "config"          # ConfigRecord
IDS = "ids"                # ArrayRecord of int64 sample ids
CONTROL = "control"        # ConfigRecord: step counters, phase, refusals
GRAD = "grad"              # ArrayRecord {"grad": float32 (n, C, H, W)}
PROTECTED = "protected"    # ArrayRecord {"xhat": uint8 q = round(255·x̂) or float32 x̂ (n, C, H, W), "ids": int64 (n,)}
RESULT = "result"          # ArrayRecord {"ce": float32 (n,)} (validation) or {"correct": uint8 0/1 (n,)} (test)
METRICS = "metrics"        # MetricRecord
WEIGHTS = "transform_net"  # ArrayRecord: h_θ state dict (fedavg only — h_θ is public by design)
NO_INDEX = -1              # "no step / batch / chunk" in a control record (control records hold integers)


def tensor_array(t: "torch.Tensor | np.ndarray") -> Array:
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return Array(np.ascontiguousarray(t))


def array_tensor(a: Array) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.array(a.numpy(), copy=True))


def get_arrays(content: RecordDict, key: str) -> dict[str, np.ndarray] | None:
    """The numpy arrays of one ArrayRecord (what a ClientApp relays to its user's trainer)."""
    if key not in content.array_records:
        return None
    return {name: a.numpy() for name, a in content.array_records[key].items()}


def make_content(config: dict | None = None, control: dict | None = None, metrics: dict | None = None,
                 **arrays: dict[str, torch.Tensor]) -> RecordDict:
    """A RecordDict from plain dicts: ``arrays`` maps a record key to {name: tensor}."""
    rd = RecordDict()
    if config is not None:
        rd[CONFIG] = ConfigRecord(config)
    if control is not None:
        rd[CONTROL] = ConfigRecord(control)
    if metrics is not None:
        rd[METRICS] = MetricRecord(metrics)
    for key, tensors in arrays.items():
        if tensors is not None:
            rd[key] = ArrayRecord({name: tensor_array(t) for name, t in tensors.items()})
    return rd


class ProtocolError(ValueError):
    """A message that breaks the protocol; the reason goes back to its sender."""


@dataclass
class Submission:
    """A validated batch of protected images from one user."""

    batch: int                # index of the batch (train) or chunk (eval) these images belong to
    xhat: torch.Tensor
    ids: torch.Tensor


def validate_submission(msg: Message, allowed_ids: torch.Tensor, image_shape: tuple[int, ...],
                        max_batch: int, wire: str = "uint8") -> Submission | None:
    """Check a user's reply before any of it reaches ψ; raise :class:`ProtocolError` with the reason.

    ``wire`` is the run's (pp_flower.wire): x̂ must arrive as uint8 (an 8-bit image) or as float32 in [0, 1].
    The returned ``xhat`` is what ψ is fed: float32 q/255 or x̂. Returns None when the reply carries no images
    (a user that only applied a gradient).
    """
    import torch

    content = msg.content
    if CONTROL not in content.config_records:
        raise ProtocolError("reply lacks its control record")
    control = content.config_records[CONTROL]
    try:
        int(control["step"])
        batch = int(control["batch"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"control record malformed: {exc}") from exc
    if PROTECTED not in content.array_records:
        if batch != NO_INDEX:
            raise ProtocolError(f"reply announces batch {batch} but carries no protected images")
        return None
    record = content.array_records[PROTECTED]
    if set(record.keys()) != {"xhat", "ids"}:
        raise ProtocolError(f"protected record must hold exactly 'xhat' and 'ids', got {sorted(record.keys())}")
    xa, ia = record["xhat"], record["ids"]
    if xa.dtype != wire:  # the run's wire; a float32 x̂ on a uint8 run would hand the provider more than agreed
        raise ProtocolError(f"xhat must be {wire} (wire={wire}), got {xa.dtype}")
    if ia.dtype != "int64":
        raise ProtocolError(f"ids must be int64, got {ia.dtype}")
    n = ia.shape[0] if len(ia.shape) == 1 else -1
    if n < 1 or n > max_batch:
        raise ProtocolError(f"ids must be a vector of 1..{max_batch} sample ids, got shape {ia.shape}")
    if tuple(xa.shape) != (n, *image_shape):
        raise ProtocolError(f"xhat must have shape {(n, *image_shape)}, got {tuple(xa.shape)}")
    from pp_flower.wire import decode

    xhat, ids = decode(array_tensor(xa)), array_tensor(ia)  # uint8 is in range by its type
    if not torch.isfinite(xhat).all():
        raise ProtocolError("xhat contains NaN or Inf")
    if xhat.min() < 0.0 or xhat.max() > 1.0:
        raise ProtocolError("xhat leaves [0, 1] (h_θ ends in a sigmoid)")
    if not torch.isin(ids, allowed_ids).all():
        raise ProtocolError("ids include samples that were not handed to this user")
    if len(torch.unique(ids)) != n:
        raise ProtocolError("ids repeat a sample")
    return Submission(batch, xhat, ids)


# A user whose live state is gone (a restarted SuperNode or trainer) answers with an error containing this text;
# the provider then sends it a resume setup.
NOT_SET_UP = "this user has not been set up"
