"""Checkpoints that say what they hold: atomic writes, and loads that refuse the wrong kind with a clear error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pp_flower.errors import PPFlowerError
from pp_flower.models import PositionalUNet, UNet, build_classifier

FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: a kill mid-write never leaves a broken checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and prove it writable now, before any work: a clear error names it and says why."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ppflower-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PPFlowerError(f"{what} '{path}' is not a writable directory ({exc.strerror or exc}); choose another "
                            "path.") from None
    return path


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Load a checkpoint written by pp-flower and check that it holds a ``kind`` (classifier / transform_net / …)."""
    path = Path(path)
    if not path.is_file():
        raise PPFlowerError(f"Checkpoint {path} does not exist.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise PPFlowerError(f"Cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(blob, dict) or "kind" not in blob:
        raise PPFlowerError(f"{path} is not a pp-flower checkpoint (no 'kind' field).")
    if blob["kind"] != kind:
        raise PPFlowerError(f"{path} holds a {blob['kind']} checkpoint, but a {kind} checkpoint is needed here.")
    return blob


def load_resume_point(path: str | os.PathLike, kind: str, config: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The resume checkpoint at ``path`` if there is one; one written with another configuration is refused."""
    if not Path(path).exists():
        return None
    blob = load_checkpoint(path, kind)
    if blob["config"] != config:
        raise PPFlowerError(f"{path} was written with another {what} configuration; use another --out.")
    return blob


def classifier_blob(model: nn.Module, arch: str, num_classes: int, **extra: Any) -> dict[str, Any]:
    return {"kind": "classifier", "version": FORMAT_VERSION, "arch": arch, "num_classes": num_classes,
            "state_dict": model.state_dict(), **extra}


def load_classifier(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """ψ from a ``ppflower train-classifier`` checkpoint, frozen and in eval mode."""
    blob = load_checkpoint(path, "classifier")
    model = build_classifier(blob["arch"], blob["num_classes"])
    if blob.get("baseline") == "tanaka":  # ψ on Tanaka-encrypted images: adaptation network in front
        from pp_flower.baselines.tanaka import AdaptationNetwork

        model = nn.Sequential(AdaptationNetwork(), model)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise PPFlowerError(f"Checkpoint {path} does not fit a {blob['arch']}: {exc}") from exc
    model.requires_grad_(False)
    return model.eval(), blob


def transform_blob(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """A transformation network (h_θ, or the GAN baseline's generator) as a checkpoint."""
    blob = {"kind": "transform_net", "version": FORMAT_VERSION, "base": model.base, "depth": model.depth,
            "unet-arch": model.arch, "state_dict": model.state_dict(), **extra}
    if isinstance(model, PositionalUNet):
        blob.update(architecture="positional-unet", pos_channels=model.pos_channels, size=model.size)
    return blob


def load_transform_net(path: str | os.PathLike, base: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """h_θ (a U-Net) from a checkpoint; ``base`` (width) is checked when given."""
    blob = load_checkpoint(path, "transform_net")
    if base is not None and blob["base"] != base:
        raise PPFlowerError(f"{path} holds a U-Net of width {blob['base']}, expected width {base}.")
    if blob.get("architecture") == "positional-unet":
        model = PositionalUNet(blob["base"], blob["depth"], blob["pos_channels"], blob["size"],
                               arch=blob.get("unet-arch", "ours"))  # checkpoints before 0.2 hold v0.1's U-Net
    else:
        model = UNet(base=blob["base"], depth=blob["depth"], arch=blob.get("unet-arch", "ours"))
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise PPFlowerError(f"Checkpoint {path} does not fit a U-Net(base={blob['base']}): {exc}") from exc
    return model.eval(), blob
