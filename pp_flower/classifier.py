"""Step (1) of the framework: the provider trains ψ on its labelled images (resumable after a kill).

Recipe (the paper's): SGD, momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 × 0.2 at 30/60/80 % of the
epochs, random crop (pad 4) + horizontal flip; the checkpoint with the lowest validation loss is kept.
Every batch is a pure function of (seed, epoch, step), so a run resumed from ``last.pt`` sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pp_flower.checkpoints import FORMAT_VERSION, classifier_blob, ensure_writable_dir, save_atomic
from pp_flower.data import ImageSet, Splits, augment, to_float
from pp_flower.errors import PPFlowerError
from pp_flower.models import build_classifier
from pp_flower.progress import track
from pp_flower.seeds import derive_seed
from pp_flower.training import Job, SGDRecipe, data_key, fit


@dataclass
class ClassifierConfig(SGDRecipe):
    arch: str = "resnet20"
    augment: bool = True
    baseline: str = ""  # "" (plain images), "tanaka", "pixel", "pixel-per-image" or "gan": ψ on protected images
    key: int = 0        # the baseline's key
    transform: str = ""  # baseline "gan": the GAN generator's transform_net checkpoint
    checkpoint_every: int = 10  # steps between mid-epoch checkpoints (resume points)
    label_smoothing: float = 0.0  # the paper: none (plain cross-entropy)
    fast: bool = False  # channels-last + bfloat16 autocast for the training step (evaluation stays fp32)


@torch.no_grad()
def model_input(images: torch.Tensor, ids: torch.Tensor, cfg: "ClassifierConfig",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """What ψ sees for uint8 images: plain, or encrypted with a baseline's key (augmented when ``generator``).

    Tanaka's encryption is applied after augmenting the plain image (the user encrypts its own augmented
    images; crops would break block alignment otherwise); pixel-based encryption is augmented in the
    encrypted domain, as in Sirichotedumrong et al.
    """
    if cfg.baseline in ("", "tanaka"):
        if generator is not None:
            images = augment(images, generator)
        if cfg.baseline == "tanaka":
            from pp_flower.baselines import TanakaEncryption

            return TanakaEncryption(cfg.key).encrypt(images).float().div(15)
        return to_float(images)
    if cfg.baseline in ("pixel", "pixel-per-image"):
        from pp_flower.baselines import PixelEncryption

        encrypted = PixelEncryption(cfg.key, per_image=cfg.baseline == "pixel-per-image").encrypt(images, ids)
        if generator is not None:
            encrypted = augment(encrypted, generator)
        return to_float(encrypted)
    if cfg.baseline == "gan":  # the user transforms its own (augmented) plain images with G
        if generator is not None:
            images = augment(images, generator)
        return _gan_generator(cfg.transform)(to_float(images))
    raise PPFlowerError(f"Unknown baseline '{cfg.baseline}' (expected tanaka, pixel, pixel-per-image or gan).")


_GENERATORS: dict[str, nn.Module] = {}


def _gan_generator(path: str) -> nn.Module:
    """The GAN-based transformation's generator (read-only, cached per process)."""
    if not path:
        raise PPFlowerError("Baseline 'gan' needs the generator's checkpoint (--transform PATH).")
    if path not in _GENERATORS:
        from pp_flower.checkpoints import load_transform_net

        _GENERATORS[path] = load_transform_net(path)[0].requires_grad_(False).eval()
    return _GENERATORS[path]


def check_run(cfg: "ClassifierConfig", splits: Splits) -> None:
    """Everything that would fail mid-run, refused before any work in one line: the options' ranges, ψ's and the
    baseline's limits on these images, a batch BatchNorm can train on, the GAN generator's kind and size."""
    from pp_flower.models import CLASSIFIERS, check_classifier_input, check_trainable

    if cfg.arch not in CLASSIFIERS:
        raise PPFlowerError(f"--model must be one of {', '.join(CLASSIFIERS)}, got '{cfg.arch}'.")
    if not 0 <= cfg.label_smoothing < 1 or cfg.checkpoint_every < 0 or cfg.key < 0:
        raise PPFlowerError("--label-smoothing must be in [0, 1), --checkpoint-every ≥ 0 and --key ≥ 0; got "
                            f"{cfg.label_smoothing}, {cfg.checkpoint_every}, {cfg.key}.")
    if cfg.baseline not in ("", "tanaka", "pixel", "pixel-per-image", "gan"):
        raise PPFlowerError(f"Unknown baseline '{cfg.baseline}' (expected tanaka, pixel, pixel-per-image or gan).")
    size = tuple(splits.train.images.shape[-2:])
    check_classifier_input(cfg.arch, size)
    check_trainable(cfg.arch, size, cfg.batch_size, len(splits.train), f"ψ ({cfg.arch})")
    if len(splits.val) < 1 or len(splits.test) < 1:
        raise PPFlowerError("ψ needs validation and test images: --limit-eval must be ≥ 1 (or 0 for all).")
    if cfg.baseline == "tanaka":
        from pp_flower.baselines.tanaka import check_block_size

        check_block_size(size)
    if cfg.baseline == "gan":
        from pp_flower.checkpoints import check_image_size_matches, load_checkpoint

        if not cfg.transform:
            raise PPFlowerError("Baseline 'gan' needs the generator's checkpoint (--transform PATH).")
        check_image_size_matches(load_checkpoint(cfg.transform, "transform_net"), size, cfg.transform,
                                 "the training images")


def chance_line(accuracy: float, num_classes: int, n: int, what: str = "ψ") -> str | None:
    """A loud line when ``accuracy`` on ``n`` images cannot be told from guessing (within 3 standard deviations
    of 1/``num_classes``), else None: a ψ at chance learned nothing, and h_θ trained against it means nothing."""
    import math

    if n < 1 or num_classes < 2:
        return None
    p = 1 / num_classes
    if accuracy > p + 3 * math.sqrt(p * (1 - p) / n):
        return None
    return (f"WARNING: {what} is at chance level — validation accuracy {100 * accuracy:.1f} % on {n} images, "
            f"chance {100 * p:.1f} % for {num_classes} classes: it learned nothing. Train longer (--epochs), on more "
            f"images (--limit-train), or with the cpu preset's recipe (--schedule onecycle --lr 0.15 "
            f"--label-smoothing 0.1); anything measured through it is meaningless.")


def chance_line_of(blob: dict) -> str | None:
    """:func:`chance_line` for a ψ checkpoint (its recorded validation accuracy); None when it has no record."""
    val = blob.get("val") or {}
    if "val-accuracy" not in val or "n-val" not in blob:
        return None
    return chance_line(float(val["val-accuracy"]), int(blob["num_classes"]), int(blob["n-val"]))


def build_model(cfg: "ClassifierConfig", num_classes: int) -> nn.Module:
    """ψ, preceded by Tanaka's adaptation network when ψ works on Tanaka-encrypted images."""
    model = build_classifier(cfg.arch, num_classes)
    if cfg.baseline == "tanaka":
        from pp_flower.baselines.tanaka import AdaptationNetwork

        model = nn.Sequential(AdaptationNetwork(), model)
    return model


def evaluate(model: nn.Module, data: ImageSet, device: str, batch_size: int = 500, desc: str = "Evaluating",
             cfg: "ClassifierConfig | None" = None, ids: torch.Tensor | None = None) -> dict:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (encrypted first when ``cfg`` names a baseline)."""
    model.eval()
    loss, correct = 0.0, 0
    chunks = list(torch.split(torch.arange(len(data)), batch_size))
    ids = torch.arange(len(data)) if ids is None else ids
    for idx in track(chunks, desc):
        images = data.images[idx]
        x = (model_input(images, ids[idx], cfg) if cfg and cfg.baseline else to_float(images)).to(device)
        y = data.labels[idx].to(device)
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return {"loss": loss / max(len(data), 1), "accuracy": correct / max(len(data), 1)}


def bf16_autocast_pays(device: str) -> bool:
    """bf16 autocast speeds a step only where the hardware has bf16 units; a CPU without them (AVX2 only)
    emulates it, measured 12x slower than fp32 on a 2-core AMD EPYC, so ``fast`` keeps fp32 there."""
    if torch.device(device).type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.device(device).type != "cuda" or torch.cuda.is_bf16_supported()


def train_classifier(splits: Splits, out_dir: str | Path, cfg: ClassifierConfig, device: str = "cpu",
                     log=print) -> dict:
    """Train ψ, writing ``last.pt`` (resume point), ``best.pt`` (lowest val loss) and ``metrics.json``."""
    check_run(cfg, splits)
    out = ensure_writable_dir(out_dir, "--out")
    num_classes = len(splits.train.classes)
    size = list(splits.train.images.shape[-2:])
    torch.manual_seed(derive_seed(cfg.seed, "classifier-init"))
    model = build_model(cfg, num_classes).to(device)
    bf16 = cfg.fast and bf16_autocast_pays(device)
    if cfg.fast:
        model = model.to(memory_format=torch.channels_last)
        log(f"fast: channels-last, {'bfloat16 autocast' if bf16 else 'fp32 (this CPU has no native bfloat16)'}")
    opt = cfg.optimizer(model)
    header = dict(arch=cfg.arch, num_classes=num_classes, baseline=cfg.baseline, key=cfg.key,
                  classes=list(splits.train.classes))

    # on a GPU the training images stay resident there (45,000 CIFAR images: 138 MB) and are augmented in place
    resident = splits.train.images.to(device) if torch.device(device).type == "cuda" and not cfg.baseline else None

    def step(idx: torch.Tensor, g: torch.Generator) -> dict[str, float]:
        images = splits.train.images[idx] if resident is None else resident[idx.to(device)]
        x = model_input(images, splits.train_ids[idx], cfg, g if cfg.augment else None).to(device)
        if cfg.fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), splits.train.labels[idx].to(device), label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"train-loss": loss.item()}

    def validate() -> dict[str, float]:
        val = evaluate(model, splits.val, device, desc="validation", cfg=cfg, ids=splits.val_ids)
        return {"val-loss": val["loss"], "val-accuracy": val["accuracy"]}

    def save_best(epoch: int, val: dict) -> None:
        save_atomic(classifier_blob(model, cfg.arch, num_classes, baseline=cfg.baseline, key=cfg.key, epoch=epoch,
                                    val=val, classes=list(splits.train.classes), **{"image-size": size,
                                                                                    "n-val": len(splits.val)}),
                    out / "best.pt")

    # the resume key: everything that defines the result (checkpoint_every does not), and the images themselves
    key = {**{k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"}, **data_key(splits)}
    job = Job(kind="classifier", config=key, modules={"state_dict": model}, optimizers={"optimizer": opt},
              step=step, validate=validate, save_best=save_best, n_train=len(splits.train), epochs=cfg.epochs,
              batch_size=cfg.batch_size, seed=cfg.seed, lr=cfg.lr_at,
              checkpoint_every=cfg.checkpoint_every, header={"version": FORMAT_VERSION, **header}, desc="ψ")
    state = fit(job, out, log=log)

    best, best_blob = _load_best(out / "best.pt", device)
    test = evaluate(best, splits.test, device, desc="test", cfg=cfg, ids=splits.test_ids + len(splits.train_all))
    metrics = {"arch": cfg.arch, "baseline": cfg.baseline or "none", "key": cfg.key, "config": asdict(cfg),
               "test-accuracy": test["accuracy"], "test-loss": test["loss"],
               "best-val-loss": state["best-val-loss"], "best-epoch": state["best-epoch"], "history": state["history"],
               "classes": list(splits.train.classes),
               "n-train": len(splits.train), "n-val": len(splits.val), "n-test": len(splits.test),
               "wall-seconds-this-session": state["wall-seconds-this-session"], "checkpoint": str(out / "best.pt")}
    warning = chance_line(best_blob["val"]["val-accuracy"], num_classes, len(splits.val))
    metrics["at-chance"] = warning is not None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"test accuracy {test['accuracy']:.4f} (best.pt, {len(splits.test)} images) → {out / 'metrics.json'}")
    if warning:
        log(warning)
    return metrics


def _load_best(path: Path, device: str):
    from pp_flower.checkpoints import load_classifier

    model, blob = load_classifier(path)
    return model.to(device), blob
