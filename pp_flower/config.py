"""The app's run configuration: one dataclass, defaults mirrored in pyproject's ``[tool.flwr.app.config]``.

Keys are kebab-case in run configs (``alpha=0.005 batch-size=64``) and snake_case in Python.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from pp_flower.errors import PPFlowerError


PATH_KEYS = ("classifier", "data-dir", "vgg-weights", "run-dir")  # resolved against the caller's directory


@dataclass
class AppConfig:
    # --- the paper's h_θ training (Sec. III-C) ---
    alpha: float = 0.005            # weight of the feature term in L_trans = L_class − α·L_feat
    epochs: int = 1                 # the paper: 200
    batch_size: int = 128
    lr: float = 0.01                # × 0.2 at 30/60/80 % of the epochs (the paper: 0.1, for 200 epochs)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True            # random crop (pad 4) + horizontal flip
    unet_base: int = 16             # the paper: 64 (widths 64…1024); 16 fits a CPU
    unet_depth: int = 4
    unet_arch: str = "paper"        # paper: the authors' U-Net (lib/unet.py); ours: v0.1's (transposed convs)
    feature_layer: int = 9          # φ = vgg16().features[:9] → relu2_2
    seed: int = 0
    # --- data handed out by the provider ---
    partition: str = "iid"          # iid: disjoint shards; full: every user gets all training images
    limit_train: int = 0            # 0 = all 45,000 training images
    limit_eval: int = 0             # 0 = all 5,000 validation and 10,000 test images
    eval_chunk: int = 500           # images per evaluation message
    data_dir: str = ""              # "" = PPFLOWER_DATA_DIR or torchvision's CIFAR-10
    vgg_weights: str = ""           # "" = PPFLOWER_VGG_WEIGHTS or torchvision's weights
    # --- the provider ---
    classifier: str = "runs/classifier/best.pt"
    provider_device: str = "auto"
    provider_microbatch: int = -1   # images per ψ pass: -1 = auto (128 on CPU, all at once on GPU), 0 = all
    aggregate: str = "none"         # none | fedavg (average all users' h_θ every aggregate_every steps)
    aggregate_every: int = 50
    grad_noise: float = 0.0         # defence: Gaussian noise on each returned ∂L_class/∂x̂, std = this × ‖g‖/√d
    #                                 per image (d = its pixels×channels): 1.0 gives noise as large as the gradient
    # --- the wire ---
    wire: str = "uint8"             # uint8: x̂ travels as the 8-bit image round(255·x̂) (the paper's images);
    #                                 float32: x̂ itself, strictly more than an image (docs/threat-model.md)
    probe_images: int = 2000        # users keep the gradients of this many own images to measure label leakage
    # --- run mechanics ---
    run_dir: str = "runs/sim"
    step_timeout: float = 120.0     # seconds a user may take for one message before it is dropped for that step
    max_failures: int = 3           # consecutive failures after which a user is dropped (until its node rejoins)
    min_users: int = 0              # wait until this many users' SuperNodes are connected (0 = whoever is there)
    wait_for_users: float = 300.0   # seconds to wait for min-users before giving up
    checkpoint_every: int = 0       # users save a resume point every N steps (0 = at each validation only)
    keep_epochs: str = ""           # e.g. "1,2,4,8": users also keep h_θ after these epochs (user-K/epoch-E.pt)
    num_threads: int = 0            # torch threads per user process (0 = leave torch's default)
    user_device: str = "auto"
    keep_graph: str = "auto"        # keep | recompute | auto: a live user keeps batch t's autograd graph until
    #                                 its gradient arrives (no re-forward) unless memory is short

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "AppConfig":
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in known:
                raise PPFlowerError(f"Unknown run-config key '{key}'. Known keys: {', '.join(cls.keys())}.")
            typ = type(known[name].default)
            if typ in (int, float) and isinstance(value, bool):  # TOML's true is no number (it became 1.0)
                raise PPFlowerError(f"Run-config key '{key}' must be a number, got {str(value).lower()}.")
            if typ is bool:
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, bool):
                    raise PPFlowerError(f"Run-config key '{key}' must be true or false, got {value!r}.")
            elif typ is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
                raise PPFlowerError(f"Run-config key '{key}' must be a whole number, got {value!r}.")
            try:
                values[name] = typ(value)
            except (TypeError, ValueError, OverflowError):
                raise PPFlowerError(f"Run-config key '{key}' must be {typ.__name__}, got {value!r}.") from None
            if typ is float and not math.isfinite(values[name]):
                raise PPFlowerError(f"Run-config key '{key}' must be a finite number, got {value!r}.")
        cfg = cls(**values)
        cfg.check()
        return cfg

    # (key, lowest allowed, highest allowed or None)
    RANGES = (("alpha", 0.0, None), ("epochs", 1, None), ("batch_size", 1, None), ("lr", 1e-12, None),
              ("momentum", 0.0, 0.999999), ("weight_decay", 0.0, None), ("unet_base", 4, None), ("unet_depth", 1, 6),
              ("feature_layer", 1, 16), ("seed", 0, None), ("limit_train", 0, None), ("limit_eval", 0, None),
              ("eval_chunk", 1, None), ("provider_microbatch", -1, None), ("aggregate_every", 1, None),
              ("step_timeout", 0.001, None), ("max_failures", 1, None), ("min_users", 0, None),
              ("wait_for_users", 0.0, None), ("checkpoint_every", 0, None), ("num_threads", 0, None),
              ("grad_noise", 0.0, 1e6), ("probe_images", 0, None))

    def check(self) -> None:
        """Every key's range in one place; an error names the key and what it may be."""
        for name, low, high in self.RANGES:
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                allowed = f"≥ {low:g}" if high is None else f"between {low:g} and {high:g}"
                if name == "lr":
                    allowed = "> 0"
                raise PPFlowerError(f"Run-config key '{name.replace('_', '-')}' must be {allowed}, got {value!r}.")
        for name in ("user_device", "provider_device"):
            check_device_name(getattr(self, name), f"Run-config key '{name.replace('_', '-')}'")
        if self.partition not in ("iid", "full"):
            raise PPFlowerError(f"partition must be 'iid' or 'full', got '{self.partition}'.")
        if self.aggregate not in ("none", "fedavg"):
            raise PPFlowerError(f"aggregate must be 'none' or 'fedavg', got '{self.aggregate}'.")
        self.kept_epochs()
        if self.unet_arch not in ("paper", "ours"):
            raise PPFlowerError(f"unet-arch must be 'paper' or 'ours', got '{self.unet_arch}'.")
        if self.wire not in ("uint8", "float32"):
            raise PPFlowerError(f"wire must be 'uint8' or 'float32', got '{self.wire}'.")
        if self.keep_graph not in ("auto", "keep", "recompute"):
            raise PPFlowerError(f"keep-graph must be 'auto', 'keep' or 'recompute', got '{self.keep_graph}'.")

    def kept_epochs(self) -> set[int]:
        try:
            return {int(e) for e in self.keep_epochs.replace(" ", "").split(",") if e}
        except ValueError:
            raise PPFlowerError(
                f"keep-epochs must list whole epochs like \"1,2,4,8\", got {self.keep_epochs!r}.") from None

    def to_run_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]


def parse_run_config(text: str) -> dict[str, Any]:
    """Flower's own ``--run-config`` grammar (what ``flwr run . --run-config`` accepts): ``key=value`` pairs with
    TOML values (strings quoted: ``classifier="runs/c/best.pt" alpha=0.005 augment=false``), or one ``.toml`` file."""
    import click
    from flwr.common.config import parse_config_args

    text = text.strip()
    if not text:
        return {}
    if not text.endswith(".toml"):
        check_key_value_text(text)
    try:
        return dict(parse_config_args([text]))
    except (click.ClickException, ValueError, OSError) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        raise PPFlowerError(f"--run-config {text!r}: {message} Strings must be quoted, e.g. "
                            'classifier="runs/classifier/best.pt".') from None


# Flower's own pattern for one pair (flwr.common.config.parse_config_args); text it does not match is dropped there
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def check_key_value_text(text: str) -> None:
    """Refuse run-config text that is not whitespace-separated ``key=value`` pairs: Flower silently drops it, so
    ``'epochs=2 alpha= 0.05'`` ran with the default α."""
    leftover, end = [], 0
    for match in _PAIR.finditer(text):
        leftover.append(text[end:match.start()])
        if match.start() > 0 and not text[match.start() - 1].isspace():
            leftover.append(text[end:match.end()])
        end = match.end()
    leftover.append(text[end:])
    bad = " ".join(piece.strip() for piece in leftover if piece.strip())
    if bad:
        raise PPFlowerError(f"--run-config: {bad!r} is not a key=value pair (whole text: {text!r}); write each "
                            'setting as key=value with no spaces around "=", strings quoted, e.g. '
                            "'alpha=0.05 classifier=\"runs/classifier/best.pt\"'.")


def format_run_config(values: Mapping[str, Any]) -> str:
    """The ``--run-config`` text for ``values`` in Flower's grammar (strings quoted), for commands we start."""
    import json

    def toml(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        return json.dumps(str(value))

    return " ".join(f"{k}={toml(v)}" for k, v in values.items())


def preflight(cfg: AppConfig) -> None:
    """Fail fast, with one clear line, when ψ, the images or φ cannot serve this run (before any round starts).

    The run dir must be writable, ψ must exist and be a classifier for the data's classes, the images must fit
    the U-Net's depth and φ's weights must load.
    """
    from pp_flower.checkpoints import ensure_writable_dir, load_classifier
    from pp_flower.data import load_datasets
    from pp_flower.features import load_feature_net

    resolve_device(cfg.provider_device, "Run-config key 'provider-device'")  # the provider runs on this machine
    require_classifier(cfg.classifier)
    _, blob = load_classifier(cfg.classifier)
    train, _ = load_datasets(cfg.data_dir or None)
    check_app_inputs(cfg, blob, train, cfg.classifier)
    load_feature_net(cfg.vgg_weights or None, cfg.feature_layer)
    ensure_writable_dir(cfg.run_dir, "run-dir")  # last: a refused run leaves no directory behind


def check_app_inputs(cfg: AppConfig, blob: dict[str, Any], train: Any, path: Any) -> None:
    """What the Flower app's ψ and images must be, in one place (preflight, and the provider where no preflight
    ran): ψ trained on plain images of these classes and this size, images the U-Net can take, batches BatchNorm
    can train on (:func:`pp_flower.models.check_trainable`)."""
    from pp_flower.checkpoints import check_image_size_matches, require_plain_classifier
    from pp_flower.models import check_image_size, check_trainable

    size = tuple(train.images.shape[-2:])
    require_plain_classifier(blob, path, "h_θ training (the Flower app)")
    check_image_size(size, cfg.unet_depth, "The training images")
    check_class_match(blob, train.classes, path)
    check_image_size_matches(blob, size, path, "the training images")
    check_trainable("unet", size, cfg.batch_size, 2, "h_θ", cfg.unet_depth)


def require_classifier(path: str) -> None:
    """ψ's checkpoint must exist; the error says how to make one."""
    from pathlib import Path

    if not Path(path).is_file():
        raise PPFlowerError(f"ψ checkpoint '{path}' not found; train one with `ppflower train-classifier --out DIR` "
                            'and pass classifier="DIR/best.pt" in the run config.')


def check_class_match(classifier_blob: dict[str, Any], classes: tuple[str, ...], path: Any) -> None:
    """ψ labels exactly the data's classes: a 10-class ψ on 3-class data would report wrong accuracies."""
    known = classifier_blob.get("classes")
    if classifier_blob["num_classes"] != len(classes) or (known is not None and tuple(known) != tuple(classes)):
        theirs = ", ".join(known) if known else f"{classifier_blob['num_classes']} classes"
        raise PPFlowerError(f"ψ ({path}) was trained on {theirs}, but the data has {len(classes)} classes "
                            f"({', '.join(classes)}); train ψ on this data set first.")


def check_device_name(device: str, what: str = "--device") -> None:
    """A device string pp-flower understands (auto, cpu, cuda, cuda:N, mps), checked before anything is loaded."""
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", device):
        raise PPFlowerError(f"{what} must be auto, cpu, cuda, cuda:N or mps, got {device!r}.")


def available_devices() -> list[str]:
    """The devices this machine has, as torch names them."""
    import torch

    found = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def resolve_device(device: str, what: str = "--device") -> str:
    """The one device rule of the project: ``auto`` = the first GPU when there is one, else the CPU; any other name
    must be a device this machine has, or one line names what it has."""
    check_device_name(device, what)
    have = available_devices()
    if device == "auto":
        return "cuda" if "cuda:0" in have else "cpu"
    if device in have or (device == "cuda" and "cuda:0" in have):
        return device
    raise PPFlowerError(f"{what} {device}: this machine has no such device (it has: {', '.join(have)}); use "
                        f"{'auto or ' if len(have) > 1 else ''}{' or '.join(have[:3])}.")
