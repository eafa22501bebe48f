"""Checkpoints that say what they hold: atomic writes, and loads that refuse the wrong kind with a clear error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pp_flower.errors import PPFlowerError
from pp_flower.models import PositionalUNet, UNet, build_classifier

FORMAT_VERSION = 2  # 2: ψ and h_θ record the image size they were trained at ("image-size"); 1 did not


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


# what each kind of checkpoint is, in the words of an error message
KINDS = {
    "classifier": "a classifier ψ (from `ppflower train-classifier`)",
    "transform_net": "a transformation network (h_θ from `flower-simulation`, or the GAN's generator from "
                     "`ppflower train-gan`)",
    "inverse_net": "an ITN-Attack inverse network (from `ppflower attack`)",
    "attack_state": "a resume point of `ppflower attack` (last.pt)",
    "gan_state": "a resume point of `ppflower train-gan` (last.pt)",
    "user_state": "a user's resume point of `flower-simulation` (resume.pt)",
}
BASELINE_WORDS = {"": "plain images", "tanaka": "Tanaka-encrypted images (--baseline tanaka)",
                  "pixel": "pixel-encrypted images (--baseline pixel)",
                  "pixel-per-image": "pixel-encrypted images with per-image keys (--baseline pixel-per-image)",
                  "gan": "GAN-transformed images (--baseline gan)"}


def describe(blob: dict[str, Any]) -> str:
    """What a checkpoint holds, in words: its kind, and for ψ the images it was trained on."""
    kind = blob.get("kind")
    what = KINDS.get(kind, f"a '{kind}' checkpoint")
    if kind == "classifier":
        what = f"a classifier ψ trained on {BASELINE_WORDS.get(blob.get('baseline') or '', blob.get('baseline'))}"
    elif kind == "transform_net" and blob.get("baseline") == "gan":
        what = "the GAN baseline's generator (from `ppflower train-gan`)"
    elif kind == "transform_net":
        what = "a transformation network h_θ"
    return what


def load_checkpoint(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """Load a checkpoint written by pp-flower and check that it holds a ``kind`` (classifier / transform_net / …).

    A missing path, a directory, a file torch cannot read (text, random bytes, an empty file, another zip) and a
    checkpoint of another kind are each refused in one line naming the file, what it is and what is needed."""
    path = Path(path)
    needed = KINDS.get(kind, f"a {kind} checkpoint")
    if path.is_dir():
        raise PPFlowerError(f"{path} is a directory, not a checkpoint file; {needed} is needed here (e.g. "
                            f"{path / 'best.pt'}).")
    if not path.is_file():
        raise PPFlowerError(f"Checkpoint {path} does not exist; {needed} is needed here.")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - text, random bytes, an empty file, a zip of something else
        reason = "an empty file" if path.stat().st_size == 0 else f"torch cannot read it: {type(exc).__name__}"
        raise PPFlowerError(f"{path} is not a pp-flower checkpoint ({reason}); {needed} is needed here.") from None
    if not isinstance(blob, dict) or "kind" not in blob:
        raise PPFlowerError(f"{path} is not a pp-flower checkpoint (a torch file without pp-flower's 'kind' field); "
                            f"{needed} is needed here.")
    if blob["kind"] != kind:
        raise PPFlowerError(f"{path} holds {describe(blob)}, but {needed} is needed here.")
    return blob


def image_size_of(blob: dict[str, Any]) -> tuple[int, int] | None:
    """The (H, W) a ψ or h_θ was trained at; None for checkpoints written before pp-flower 0.3 recorded it."""
    size = blob.get("image-size")
    return (int(size[0]), int(size[1])) if size is not None else None


def check_image_size_matches(blob: dict[str, Any], size: tuple[int, int], path: Any, images: str = "the images"
                             ) -> None:
    """Refuse images of another size than the checkpoint was trained at (a ψ or h_θ of 32×32 images says nothing
    about 64×64 ones). Checkpoints older than the size field are accepted as trained at the size they are used
    at: only the U-Net's divisibility can be checked for them."""
    trained = image_size_of(blob)
    if trained is not None and tuple(trained) != tuple(size):
        raise PPFlowerError(f"{path} holds {describe(blob)} trained on {trained[0]}×{trained[1]} images, but "
                            f"{images} are {size[0]}×{size[1]}; resize them to {trained[0]}×{trained[1]} or train "
                            f"on images of this size.")


# keys of a resume key that a run may change without changing its result
RESULT_NEUTRAL = ("checkpoint_every", "checkpoint-every")
# keys added to resume keys in 0.3: a resume point written before lacks them and is accepted (assumed the same data)
LEGACY_OPTIONAL = ("data", "n-train", "n-val", "n-test", "limit-train", "limit-eval")


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(keys whose values differ and define the result, keys only the new key has that older points lack)."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if k in RESULT_NEUTRAL:
                continue
            if isinstance(v, dict) and k != "data":
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(old), flat(new)
    missing = object()
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing))
    legacy = [k for k in changed if k not in a and k.rsplit(".", 1)[-1] in LEGACY_OPTIONAL]
    return [k for k in changed if k not in legacy], legacy


def describe_changes(old: dict[str, Any], new: dict[str, Any], changed: list[str]) -> str:
    """``limit-train 64 → 512, data (another data set)`` for an error line."""
    def get(d: dict, dotted: str):
        for part in dotted.split("."):
            d = d.get(part, "unset") if isinstance(d, dict) else "unset"
        return d

    parts = []
    for k in changed[:6]:
        a, b = get(old, k), get(new, k)
        if k.rsplit(".", 1)[-1] == "data" or len(repr(a)) + len(repr(b)) > 60:
            parts.append(f"{k} (another data set)" if k.rsplit(".", 1)[-1] == "data" else k)
        else:
            parts.append(f"{k} {a!r} → {b!r}")
    return ", ".join(parts) + (" …" if len(changed) > 6 else "")


def load_resume_point(path: str | os.PathLike, kind: str, config: dict[str, Any], what: str,
                      log=None) -> dict[str, Any] | None:
    """The resume checkpoint at ``path`` if there is one; one written for another result is refused, naming what
    changed. Keys that do not change the result (``checkpoint-every``) are ignored; a point written before the
    data fingerprint existed is accepted with a note (it cannot be checked)."""
    if not Path(path).exists():
        return None
    blob = load_checkpoint(path, kind)
    changed, legacy = key_changes(blob["config"], config)
    if changed:
        raise PPFlowerError(f"{path} was written with another {what} configuration or data ("
                            f"{describe_changes(blob['config'], config, changed)}); use another --out, or delete "
                            f"{path} to start afresh.")
    if legacy and log is not None:
        log(f"{path} predates data fingerprints ({', '.join(legacy)} not recorded); resuming it assumes the same "
            f"data and limits")
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


def require_plain_classifier(blob: dict[str, Any], path: Any, consumer: str, allow_gan: bool = False) -> None:
    """ψ for h_θ (the Flower app, ``classify``) must take 3-channel protected images like the plain ones it was
    trained on; a ψ trained on a keyed encryption expects that encryption's images (6 channels for Tanaka's)."""
    baseline = blob.get("baseline") or ""
    if baseline and not (allow_gan and baseline == "gan"):
        raise PPFlowerError(f"{path} holds {describe(blob)}, but {consumer} needs a ψ trained on plain images "
                            "(`ppflower train-classifier` without --baseline).")


def transform_blob(model: nn.Module, image_size: Any = None, **extra: Any) -> dict[str, Any]:
    """A transformation network (h_θ, or the GAN baseline's generator) as a checkpoint, with the image size it
    was trained at (``image-size``: consumers refuse other sizes)."""
    blob = {"kind": "transform_net", "version": FORMAT_VERSION, "base": model.base, "depth": model.depth,
            "unet-arch": model.arch, "state_dict": model.state_dict(), **extra}
    if isinstance(model, PositionalUNet):
        blob.update(architecture="positional-unet", pos_channels=model.pos_channels, size=model.size)
        image_size = image_size or (model.size, model.size)
    if image_size is not None:
        blob["image-size"] = [int(image_size[0]), int(image_size[1])]
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
