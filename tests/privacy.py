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
    hits = []
    flat_plain = plain_images.flatten(1)  # (N, 3072) uint8
    size = flat_plain.shape[1]
    keys = {bytes(row.numpy().tobytes()) for row in flat_plain}
    for name, arr in arrays(msg):
        data = torch.from_numpy(arr.numpy().copy()).flatten()
        if data.numel() < size:
            continue
        chunks = data[: data.numel() // size * size].view(-1, size)
        if chunks.dtype == torch.uint8:
            if any(bytes(c.numpy().tobytes()) in keys for c in chunks):
                hits.append(name)
            continue
        as_float = chunks.double()
        scaled = as_float if as_float.abs().max() <= 1.5 else as_float / 255.0
        dist = torch.cdist(scaled.float(), flat_plain.float() / 255.0, p=float("inf"))
        if (dist < tol).any():
            hits.append(name)
    return hits


def label_hits(msg: Message, labels_of: dict[int, int]) -> list[str]:
    """Integer arrays or config lists that equal the labels of the sample ids travelling with them."""
    hits = []
    ids = None
    for name, arr in arrays(msg):
        if name == "ids":
            ids = torch.from_numpy(arr.numpy().copy())
    if ids is None or len(ids) < 4:
        return hits
    truth = torch.tensor([labels_of[int(i)] for i in ids])
    for name, arr in arrays(msg):
        values = torch.from_numpy(arr.numpy().copy()).flatten()
        if values.numel() == len(truth) and not values.is_floating_point() and torch.equal(values.long(), truth):
            hits.append(name)
    for rec in list(msg.content.config_records.values()) + list(msg.content.metric_records.values()):
        for name, value in rec.items():
            if isinstance(value, list) and len(value) == len(truth) and [int(v) for v in value] == truth.tolist():
                hits.append(name)
    return hits


def parameter_hits(msg: Message, state_dict: dict[str, torch.Tensor], min_numel: int = 16) -> list[str]:
    """ψ tensors whose bytes appear anywhere inside any array of the message."""
    blobs = [arr.numpy().tobytes() for _, arr in arrays(msg)]
    hits = []
    for key, tensor in state_dict.items():
        if tensor.numel() < min_numel or not tensor.is_floating_point():
            continue
        needle = tensor.detach().cpu().contiguous().numpy().tobytes()
        if any(needle in blob for blob in blobs):
            hits.append(key)
    return hits
