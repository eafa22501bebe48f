"""Content checks for the privacy audit: do message arrays hold plain images, labels or ψ's parameters?"""

from __future__ import annotations

import torch
from flwr.app import Message


def arrays(msg: Message):
    for rec in msg.content.array_records.values():
        for name, arr in rec.items():
            yield name, arr


def plain_image_hits(msg: Message, plain_images: torch.Tensor, tol: float = 2.0 / 255) -> list[str]:
    """Arrays that contain, at any image-aligned position, a plain image (uint8 or [0,1] float, any dtype)."""
    return plain_image_hits_in(((name, arr.numpy()) for name, arr in arrays(msg)), plain_images, tol)


def plain_image_hits_in(named_arrays, plain_images: torch.Tensor, tol: float = 2.0 / 255) -> list[str]:
    """``plain_image_hits`` for any (name, numpy array) pairs: e.g. the images decoded from HTTP request bodies."""
    hits = []
    flat_plain = plain_images.flatten(1)  # (N, 3072) uint8
    size = flat_plain.shape[1]
    keys = {bytes(row.numpy().tobytes()) for row in flat_plain}
    for name, arr in named_arrays:
        data = torch.from_numpy(arr.copy()).flatten()
        if data.numel() < size:
            continue
        chunks = data[: data.numel() // size * size].view(-1, size)
        if chunks.dtype == torch.uint8 and any(bytes(c.numpy().tobytes()) in keys for c in chunks):
            hits.append(name)
            continue
        as_float = chunks.double()  # an 8-bit image near a plain one counts too, not only an exact copy
        scaled = as_float / 255.0 if chunks.dtype == torch.uint8 or as_float.abs().max() > 1.5 else as_float
        dist = torch.cdist(scaled.float(), flat_plain.float() / 255.0, p=float("inf"))
        if (dist < tol).any():
            hits.append(name)
    return hits


def _values(msg: Message):
    """Every array (with its shape) and every list in the message's config and metric records, as float64."""
    for name, arr in arrays(msg):
        yield name, torch.from_numpy(arr.numpy().copy()).double()
    for rec in list(msg.content.config_records.values()) + list(msg.content.metric_records.values()):
        for name, value in rec.items():
            if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                yield name, torch.tensor([float(v) for v in value], dtype=torch.float64)


def label_hits(msg: Message, labels_of: dict[int, int], related_ids=()) -> list[str]:
    """Arrays or lists that carry the labels of sample ids, whatever their dtype: as label values (integer or
    float) or as one-hot rows. The ids are any id vector in the message itself, and ``related_ids``: the ids
    this message is about though it does not carry them (e.g. the batches its receiver sent before)."""
    candidates = [torch.from_numpy(arr.numpy().copy()).flatten() for _, arr in arrays(msg)
                  if arr.dtype in ("int64", "int32") and len(arr.shape) == 1]
    candidates += [torch.as_tensor(ids).flatten() for ids in related_ids]
    truths = [torch.tensor([labels_of[int(i)] for i in ids], dtype=torch.float64) for ids in candidates
              if len(ids) >= 4 and all(int(i) in labels_of for i in ids)]
    hits = []
    for name, values in _values(msg):
        for truth in truths:
            n = len(truth)
            if values.numel() == n and torch.equal(values.flatten(), truth):
                hits.append(name)
                break
            rows = values.reshape(n, -1) if values.numel() % n == 0 and values.numel() > n else None
            if (rows is not None and rows.shape[1] > int(truth.max()) and ((rows == 0) | (rows == 1)).all()
                    and (rows.sum(1) == 1).all() and torch.equal(rows.argmax(1).double(), truth)):
                hits.append(name)  # one-hot rows
                break
    return hits


def parameter_hits(msg: Message, state_dict: dict[str, torch.Tensor], min_numel: int = 16) -> list[str]:
    """ψ tensors whose bytes appear anywhere inside any array of the message."""
    return parameter_hits_in([arr.numpy().tobytes() for _, arr in arrays(msg)], state_dict, min_numel)


def parameter_hits_in(blobs: list[bytes], state_dict: dict[str, torch.Tensor], min_numel: int = 16,
                      prefix: int | None = None) -> list[str]:
    """ψ tensors whose bytes (float32, or only their first ``prefix`` values) appear anywhere inside ``blobs``."""
    hits = []
    for key, tensor in state_dict.items():
        if tensor.numel() < min_numel or not tensor.is_floating_point():
            continue
        needle = tensor.detach().cpu().contiguous().flatten()[:prefix].numpy().tobytes()
        if any(needle in blob for blob in blobs):
            hits.append(key)
    return hits
