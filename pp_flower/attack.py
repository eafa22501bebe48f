"""The ITN-Attack (Sec. III-D, IV-B): h_θ has no key and may be public, so anyone can make exact pairs
(h_θ(x), x) and train an inverse-transformation network that estimates x from x̂.

The attacker is a U-Net (same family and width options as h_θ) trained with MSE on pairs built from the
training images with random horizontal flips only, the paper's SGD schedule and best-validation-loss
selection; it is evaluated on the test images. ``perceptual > 0`` adds a VGG16 relu2_2 feature term to the
attacker's loss — a stronger attacker than the paper's, reported beside it.
Resumable: ``last.pt`` is written every ``checkpoint_every`` steps; rerunning continues from it.

What the attacker sees (issue #22): a :class:`ProviderTarget` hands the attacker exactly the tensor the provider
received under the run's wire (:func:`pp_flower.wire.provider_view`: q/255 under ``uint8``, x̂ itself under
``float32``), or, for a float32 run, logit(x̂) = h_θ's pre-sigmoid output (``input="logit"``). Training,
validation and evaluation all use that tensor; ``attack.json`` records the wire and the input.

Two attackers (``AttackConfig.method``):

* ``"itn"`` — the paper's ITN-Attack: U-Net, SGD, MSE (``perceptual > 0``: + VGG16 relu2_2 feature MSE).
* ``"restorer"`` — a stronger paired restorer: the same U-Net trained with Adam on
  ``l1·‖x̃ − x‖₁ + perceptual·‖φ(x̃) − φ(x)‖² + adversarial·BCE(D(a, x̃), 1)`` (φ = VGG16 up to relu2_2,
  :mod:`pp_flower.features`; D = the pix2pix PatchGAN of :mod:`pp_flower.baselines.gan`, conditioned on the
  attacker's input a), its weights chosen on the validation images (lowest ``l1·L1 + perceptual·L_feat``).
  Build it with :func:`restorer_config`.

:func:`summarise_attacks` puts every attacker on a target side by side and names the strongest by median
PSNR, median SSIM and the observer's accuracy on the estimates.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from pp_flower import wire as wires
from pp_flower.checkpoints import load_checkpoint, save_atomic
from pp_flower.data import Splits, to_float
from pp_flower.errors import PPFlowerError
from pp_flower.metrics import psnr, ssim, summary
from pp_flower.models import UNet
from pp_flower.seeds import derive_seed
from pp_flower.training import Job, SGDRecipe, fit

Target = Callable[[torch.Tensor], torch.Tensor]  # plain [0, 1] images → protected images

METHODS = ("itn", "restorer")
OPTIMS = ("sgd", "adam")
INPUTS = ("image", "logit")
# fields added after 0.3: at these values they stay out of the cache key, so results cached before them stay valid
_KEY_NEUTRAL_DEFAULTS = {"method": "itn", "optim": "sgd", "l1": 1.0, "adversarial": 0.0, "beta1": 0.9,
                         "disc_width": 64}


@dataclass
class AttackConfig(SGDRecipe):
    """The attacker's settings. Defaults: the paper's ITN-Attack (U-Net, SGD with momentum, MSE).

    ``method="restorer"`` (build it with :func:`restorer_config`) trains the same U-Net with ``optim`` (Adam) on
    ``l1``·L1 + ``perceptual``·L_feat + ``adversarial``·L_adv; ``beta1`` is Adam's first-moment decay and
    ``disc_width`` the PatchGAN's width (used when ``adversarial`` > 0). Invalid values raise PPFlowerError naming
    the option.
    """

    unet_base: int = 16
    unet_depth: int = 4
    unet_arch: str = "paper"
    perceptual: float = 0.0  # weight of the VGG16 relu2_2 feature loss (0 = the paper's MSE-only ITN)
    checkpoint_every: int = 20
    method: str = "itn"      # itn: the paper's pixel MSE; restorer: l1-weighted L1 (+ perceptual, adversarial)
    optim: str = "sgd"       # sgd: SGDRecipe's (lr, momentum, weight decay); adam: Adam(lr, (beta1, 0.999))
    l1: float = 1.0          # weight of the L1 term (restorer only)
    adversarial: float = 0.0  # weight of the PatchGAN term (restorer only; 0 = no discriminator)
    beta1: float = 0.9       # Adam's β₁ (adam only)
    disc_width: int = 64     # PatchDiscriminator width (adversarial > 0 only)

    def __post_init__(self) -> None:
        super().__post_init__()
        finite_nonneg = lambda v: math.isfinite(v) and v >= 0  # noqa: E731
        checks = (("unet-base", self.unet_base, self.unet_base >= 4, "≥ 4"),
                  ("unet-depth", self.unet_depth, 1 <= self.unet_depth <= 6, "between 1 and 6"),
                  ("unet-arch", self.unet_arch, self.unet_arch in ("paper", "ours"), "paper or ours"),
                  ("perceptual-weight", self.perceptual, finite_nonneg(self.perceptual), "a finite number ≥ 0"),
                  ("checkpoint-every", self.checkpoint_every, self.checkpoint_every >= 0, "≥ 0"),
                  ("attack-method", self.method, self.method in METHODS, " or ".join(METHODS)),
                  ("attack-optimizer", self.optim, self.optim in OPTIMS, " or ".join(OPTIMS)),
                  ("l1-weight", self.l1, finite_nonneg(self.l1), "a finite number ≥ 0"),
                  ("adversarial-weight", self.adversarial, finite_nonneg(self.adversarial), "a finite number ≥ 0"),
                  ("beta1", self.beta1, math.isfinite(self.beta1) and 0 <= self.beta1 < 1, "in [0, 1)"),
                  ("disc-width", self.disc_width, self.disc_width >= 1, "≥ 1"))
        for name, value, ok, allowed in checks:
            if not ok:
                raise PPFlowerError(f"--{name} must be {allowed}, got {value!r}.")
        if self.method == "itn" and (self.l1 != 1.0 or self.adversarial != 0.0):
            raise PPFlowerError("--l1-weight and --adversarial-weight belong to the restorer (method 'restorer'); "
                                "the paper's ITN is trained on MSE.")
        if self.method == "restorer" and self.l1 == 0 and self.perceptual == 0:
            raise PPFlowerError("The restorer needs a reconstruction term: --l1-weight or --perceptual-weight > 0.")
        if self.optim == "adam" and self.lr > 0.01:
            raise PPFlowerError(f"--lr {self.lr:g} with Adam: use a learning rate ≤ 0.01 (e.g. 1e-3; "
                                "restorer_config sets one); 0.1 is the paper's SGD rate.")

    def optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """SGDRecipe's SGD (``optim="sgd"``, unchanged) or Adam(lr, betas=(beta1, 0.999), weight_decay)."""
        if self.optim == "adam":
            return torch.optim.Adam(module.parameters(), lr=self.lr, betas=(self.beta1, 0.999),
                                    weight_decay=self.weight_decay)
        return super().optimizer(module)


def restorer_config(base: AttackConfig | None = None, *, lr: float = 1e-3, l1: float = 1.0,
                    perceptual: float = 0.01, adversarial: float = 0.0) -> AttackConfig:
    """The paired restorer with ``base``'s sizes, epochs, batch size, schedule and seed: Adam (β₁ 0.9, or pix2pix's
    0.5 with an adversarial term), no weight decay, loss ``l1``·L1 + ``perceptual``·‖φ(x̃) − φ(x)‖² (φ: VGG16
    relu2_2; 0.01 puts it at about half the L1 term on CIFAR-10) + ``adversarial``·PatchGAN BCE."""
    base = base or AttackConfig()
    return replace(base, method="restorer", optim="adam", lr=lr, weight_decay=0.0, l1=l1, perceptual=perceptual,
                   adversarial=adversarial, beta1=0.5 if adversarial > 0 else 0.9)


def attack_key(cfg: AttackConfig) -> dict:
    """The settings part of an attack's cache key: ``asdict(cfg)`` without the fields added for the restorer while
    they hold their defaults, so the paper ITN's key (and every result cached under it) is what it was."""
    return {k: v for k, v in asdict(cfg).items() if not (k in _KEY_NEUTRAL_DEFAULTS and v == _KEY_NEUTRAL_DEFAULTS[k])}


def network_target(net: nn.Module, device: str = "cpu") -> Target:
    """A transformation network (e.g. a user's h_θ) as an attack target: its raw output, no wire applied."""
    net = net.to(device).eval()

    @torch.no_grad()
    def target(x: torch.Tensor) -> torch.Tensor:
        return net(x.to(device))

    return target


@dataclass
class ProviderTarget:
    """An attack target as the provider holds it: x (n, 3, H, W) in [0, 1] → the attacker's input.

    ``transform`` maps plain images to x̂ (h_θ: (n, 3, H, W) in [0, 1]; a baseline may give other channel
    counts). :meth:`protected` is ``wire.provider_view(x̂, wire)`` — q/255 with q = round(255·x̂) under ``uint8``,
    x̂ under ``float32`` — the image whose PSNR/SSIM and recognisability are reported. Calling the target gives
    the attacker's input: that image (``input="image"``) or ``wire.logit`` of it (``input="logit"``: h_θ's
    pre-sigmoid output, only under ``float32``; under ``uint8`` the logit is a function of the image and adds
    nothing). ValueError for an unknown wire, PPFlowerError for an unknown input or logit under ``uint8``.
    """

    transform: Target
    wire: str = wires.DEFAULT
    input: str = "image"

    def __post_init__(self) -> None:
        wires.check_wire(self.wire)
        if self.input not in INPUTS:
            raise PPFlowerError(f"Attacker input must be one of {', '.join(INPUTS)}, got {self.input!r}.")
        if self.input == "logit" and self.wire != "float32":
            raise PPFlowerError("An attacker on logit(x̂) needs the float32 wire; under uint8 the provider holds "
                                "q/255 and its logit tells nothing the image does not.")

    @torch.no_grad()
    def protected(self, x: torch.Tensor) -> torch.Tensor:
        """The float tensor the provider holds for x̂ = transform(x): provider_view(x̂, wire), same shape as x̂."""
        return wires.provider_view(self.transform(x), self.wire)

    def attacker_input(self, protected: torch.Tensor) -> torch.Tensor:
        """What the attacker is handed, given the provider's tensor: itself or its logit (see the class)."""
        return wires.logit(protected) if self.input == "logit" else protected

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.attacker_input(self.protected(x))

    def cache_fields(self) -> dict:
        """The target's part of an attack's cache key. Empty for (float32, image): that tensor is what every attack
        before wires trained on (h_θ's own output), so their cached results stay valid."""
        if self.wire == "float32" and self.input == "image":
            return {}
        return {"wire": self.wire, "input": self.input}


def provider_target(net_or_fn: nn.Module | Target, wire: str = wires.DEFAULT, input: str = "image",
                    device: str = "cpu") -> ProviderTarget:
    """h_θ (a module, moved to ``device`` in eval mode) or any x → x̂ callable as the provider holds it under
    ``wire``; ``input`` as in :class:`ProviderTarget`."""
    fn = network_target(net_or_fn, device) if isinstance(net_or_fn, nn.Module) else net_or_fn
    return ProviderTarget(fn, wire, input)


def target_views(target: Target, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(protected image the provider holds, the attacker's input) for plain images ``x``. A plain callable (no
    wire: a target made before wires, or a test's function) gives ``target(x).clamp(0, 1)`` for both, as before."""
    if isinstance(target, ProviderTarget):
        protected = target.protected(x)
        return protected, target.attacker_input(protected)
    protected = target(x).clamp(0, 1)
    return protected, protected


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    mask = torch.rand(len(x), generator=g) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def _mse(estimate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(estimate, x, reduction="sum")


@torch.no_grad()
def _val_loss(estimator: nn.Module, target: Target, images: torch.Tensor, device: str, chunk: int = 500,
              loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _mse) -> float:
    """Mean per-pixel validation loss; ``loss(estimate, x)`` returns a sum over its chunk (default: squared error)."""
    estimator.eval()
    total = 0.0
    for idx in torch.split(torch.arange(len(images)), chunk):
        x = to_float(images[idx]).to(device)
        total += loss(estimator(target(x)), x).item()
    return total / (len(images) * images[0].numel())


def _gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, float(real)))


def _discriminator(in_channels: int, width: int) -> nn.Module:
    """pp_flower.baselines.gan's PatchDiscriminator on (attacker's input, image) pairs of in_channels + 3 channels."""
    from pp_flower.baselines.gan import PatchDiscriminator

    disc = PatchDiscriminator(width)
    if in_channels != 3:  # its first layer takes 3 + 3 channels; a 6-channel encryption needs 6 + 3
        disc.net[0] = nn.Conv2d(in_channels + 3, width, 4, 2, 1)
    return disc


def _describe_wire(target: Target) -> tuple[str | None, str]:
    """(wire, input) for attack.json; a plain callable has no wire (None: its own output, not quantised)."""
    if isinstance(target, ProviderTarget):
        return target.wire, target.input
    return None, "image"


def train_attack(target: Target, splits: Splits, out_dir: str | Path, cfg: AttackConfig, device: str = "cpu",
                 name: str = "target", log=print, target_id: str | None = None, force: bool = False,
                 observer: tuple[nn.Module, str] | None = None, attacker: str | None = None,
                 target_name: str | None = None, vgg_weights: str | Path | None = None) -> dict:
    """Train the inverse network on (target(x), x), keep the best on validation, evaluate on test.

    ``target``: a :class:`ProviderTarget` (the attacker trains, is selected and is evaluated on exactly the tensor
    the provider received under its wire, or that tensor's logit) or any callable (its output, as before wires).
    ``cfg.method`` picks the paper's ITN (SGD on MSE, validation MSE) or the restorer (module docstring;
    validation ``l1``·L1 + ``perceptual``·L_feat).

    Results are cached in ``out_dir`` under what produced them: ``target_id`` (e.g. the hash of h_θ's
    checkpoint), the target's wire and input (:meth:`ProviderTarget.cache_fields`), the attack settings
    (:func:`attack_key`) and the data. A rerun with the same key reuses them; another key
    is refused unless ``force``, which starts afresh — old numbers are never reported for a new target.
    ``observer`` = (classifier trained on plain images, its id) adds the recognisability of protected images
    and estimates (:func:`evaluate_attack`). ``attacker`` and ``target_name`` label the result for
    :func:`summarise_attacks` (defaults: the method, ``name``). ``vgg_weights``: φ's state-dict file for the feature
    term (``perceptual`` > 0; None: :func:`pp_flower.features.load_feature_net`'s default); not part of the key.

    Writes ``attack.json`` (metrics, per-image values, ``wire``, ``input``, ``attacker``, ``target-name``,
    ``method``, ``selected-on``, history), ``best.pt`` (the selected network), ``last.pt`` and ``fig6.png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from pp_flower.models import check_image_size, check_trainable
    from pp_flower.training import data_key

    size = tuple(splits.train.images.shape[-2:])
    check_image_size(size, cfg.unet_depth, "The images (for the attacker's U-Net, --unet-depth)")
    check_trainable("unet", size, cfg.batch_size, len(splits.train), "the ITN-Attack's inverse network",
                    cfg.unet_depth)
    if len(splits.val) < 1 or len(splits.test) < 1:
        raise PPFlowerError("The attack needs validation and test images: --limit-eval must be ≥ 1 (or 0 for all).")
    wire, view = _describe_wire(target)
    attacker = attacker or ("ITN" if cfg.method == "itn" else "restorer")
    labels = {"wire": wire, "input": view, "attacker": attacker, "target-name": target_name or name,
              "method": cfg.method}
    # what defines the result: the target and what of it the attacker sees, the settings (checkpoint_every aside)
    # and the images (their pixels)
    key = {"target": target_id or name, "attack": attack_key(cfg), **data_key(splits),
           **({"observer": observer[1]} if observer else {}),
           **(target.cache_fields() if isinstance(target, ProviderTarget) else {})}
    if (cached := _cached(out, key, force, log)) is not None:
        return _label_cached(out, cached, labels)
    torch.manual_seed(derive_seed(cfg.seed, "attack-init"))
    in_channels = target(to_float(splits.train.images[:1]).to(device)).shape[1]  # e.g. 6 for Tanaka's encryption
    estimator = UNet(cfg.unet_base, cfg.unet_depth, in_channels=in_channels, arch=cfg.unet_arch).to(device)
    opt = cfg.optimizer(estimator)
    modules, optimizers = {"state_dict": estimator}, {"optimizer": opt}
    disc = opt_d = None
    if cfg.method == "restorer" and cfg.adversarial > 0:
        disc = _discriminator(in_channels, cfg.disc_width).to(device)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
        modules["discriminator"], optimizers["opt_d"] = disc, opt_d
    phi = None
    if cfg.perceptual > 0:
        from pp_flower.features import load_feature_net

        phi = load_feature_net(vgg_weights, device=device)
    train = splits.train.images

    def restorer_loss(estimate: torch.Tensor, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """l1·L1 + perceptual·L_feat (means; ``reduction="sum"``: × the pixel count, for _val_loss)."""
        loss = cfg.l1 * F.l1_loss(estimate, x)
        if phi is not None:
            with torch.no_grad():
                fx = phi(x)
            loss = loss + cfg.perceptual * F.mse_loss(phi(estimate), fx)
        return loss * x.numel() if reduction == "sum" else loss

    def step(idx: torch.Tensor, g: torch.Generator) -> dict[str, float]:
        x = _flip(to_float(train[idx]), g).to(device)
        seen = target(x)
        estimate = estimator(seen)
        losses = {}
        if cfg.method == "itn":  # the paper's ITN, exactly as before
            loss = F.mse_loss(estimate, x)
            if phi is not None:
                with torch.no_grad():
                    fx = phi(x)
                loss = loss + cfg.perceptual * F.mse_loss(phi(estimate), fx)
        else:
            loss = restorer_loss(estimate, x)
            if disc is not None:
                loss_d = _gan_loss(disc(seen, x), True) + _gan_loss(disc(seen, estimate.detach()), False)
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                adv = _gan_loss(disc(seen, estimate), True)
                losses = {"loss-d": loss_d.item(), "loss-g-adv": adv.item()}
                loss = loss + cfg.adversarial * adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"train-loss": loss.item(), **losses}

    def save_best(epoch: int, val: dict) -> None:
        save_atomic({"kind": "inverse_net", "base": cfg.unet_base, "depth": cfg.unet_depth, "unet-arch": cfg.unet_arch,
                     "in_channels": in_channels, "state_dict": estimator.state_dict(), "target": name, "epoch": epoch,
                     "wire": wire, "input": view, "method": cfg.method}, out / "best.pt")

    if cfg.method == "itn":
        selected_on = "validation MSE"
        validate = lambda: {"val-loss": _val_loss(estimator, target, splits.val.images, device)}  # noqa: E731
    else:
        selected_on = "validation l1·L1 + perceptual·L_feat"
        validate = lambda: {"val-loss": _val_loss(estimator, target, splits.val.images, device,  # noqa: E731
                                                  loss=lambda e, x: restorer_loss(e, x, "sum"))}
    job = Job(kind="attack_state", config=key, modules=modules, optimizers=optimizers, step=step,
              validate=validate, save_best=save_best, n_train=len(train), epochs=cfg.epochs,
              batch_size=cfg.batch_size, seed=cfg.seed, lr=cfg.lr_at, checkpoint_every=cfg.checkpoint_every,
              desc=f"{attacker} on {name}")
    progress = fit(job, out, log=log)

    estimator.load_state_dict(load_inverse_net(out / "best.pt").state_dict())
    result = evaluate_attack(estimator, target, splits.test.images, device,
                             observer=observer[0] if observer else None, labels=splits.test.labels)
    result.update({"target": name, **labels, "selected-on": selected_on, "cache-key": key, "config": asdict(cfg),
                   "history": progress["history"], "best-epoch": progress["best-epoch"], "n-train": len(train),
                   "n-val": len(splits.val), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    (out / "attack.json").write_text(json.dumps(result, indent=2))
    save_attack_grid(estimator, target, splits.test.images[:8], out / "fig6.png", name, device, attacker=attacker)
    protected = (f"{result['psnr-protected']['median']:.2f} dB" if "psnr-protected" in result
                 else f"n/a ({in_channels} channels)")  # a 6-channel encryption has no PSNR to an RGB image
    log(f"{attacker} on {name}{f' ({wire} wire, {view} input)' if wire else ''}: median PSNR estimate "
        f"{result['psnr-estimated']['median']:.2f} dB, protected {protected}; "
        f"median SSIM estimate {result['ssim-estimated']['median']:.3f} (SSIM ∈ [−1, 1]: 1 = same structure, "
        "0 = none, < 0 = inverted, e.g. a negative-like image)")
    return result


def _label_cached(out: Path, result: dict, labels: dict) -> dict:
    """A reused result with the labels of this call where it lacks them (results cached before wires: their
    attacker saw the target's own output, float32 for h_θ); the file is updated so that it says so too."""
    missing = {k: v for k, v in labels.items() if k not in result}
    if "wire" in missing and missing["wire"] is not None:
        missing["wire"] = "float32"  # the key matched, so this is the (float32, image) view: what attacks saw then
    if missing:
        result.update(missing)
        tmp = out / "attack.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out / "attack.json")
    return result


def target_fingerprint(path: str | Path) -> str:
    """What identifies an attack target checkpoint: the SHA-256 of its bytes (a retrained h_θ differs)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def _cached(out: Path, key: dict, force: bool, log) -> dict | None:
    """The finished result for ``key`` in ``out``, None to (re)compute; results for another key need ``force``."""
    from pp_flower.checkpoints import describe_changes, key_changes

    done, last = out / "attack.json", out / "last.pt"
    found = (json.loads(done.read_text()).get("cache-key") or {}) if done.exists() else None
    if found is None and last.exists():
        found = load_checkpoint(last, "attack_state")["config"]
    # checkpoint_every changes no result; a result from before data fingerprints is reused if all else matches
    changed = key_changes(found, key)[0] if found is not None else []
    if done.exists() and not changed and not force:
        log(f"{done} is up to date (same target, settings and data); reusing it")
        return json.loads(done.read_text())
    if changed and not force:
        raise PPFlowerError(f"{out} holds an attack on another target, with other settings or on other data "
                            f"(differs in: {describe_changes(found, key, changed)}); rerun with --force to recompute "
                            "it, or use another --out.")
    if force:
        for f in (done, last, out / "best.pt", out / "fig6.png"):
            f.unlink(missing_ok=True)
    return None


@torch.no_grad()
def evaluate_attack(estimator: nn.Module, target: Target, images: torch.Tensor, device: str = "cpu",
                    chunk: int = 500, observer: nn.Module | None = None, labels: torch.Tensor | None = None) -> dict:
    """Per-image PSNR and SSIM of estimated vs plain and of protected vs plain images, plus quartiles.

    With an ``observer`` (an independent classifier trained on plain images) and the ``labels``, also the
    recognisability: the observer's accuracy on the protected images and on the estimates. PSNR alone does not
    say whether an image shows its content (a 5 dB image can still show its digit); chance is 1/classes, plain
    images give the observer's own accuracy.

    ``images``: uint8 (n, 3, H, W). The estimator is fed the attacker's input and the "protected" metrics are of
    the provider's image (:func:`target_views`: under a :class:`ProviderTarget`, provider_view of x̂ and, for
    ``input="logit"``, its logit). PSNR in dB (peak 1), SSIM in [−1, 1], recognisability in [0, 1].
    """
    estimator.eval()
    values: dict[str, list[torch.Tensor]] = {"psnr-estimated": [], "psnr-protected": [], "ssim-estimated": [],
                                             "ssim-protected": []}
    hits: dict[str, list[torch.Tensor]] = {"recognisability-estimated": [], "recognisability-protected": []}
    if observer is not None:
        observer = observer.to(device).eval()
    for idx in torch.split(torch.arange(len(images)), chunk):
        x = to_float(images[idx]).to(device)
        protected, seen = target_views(target, x)
        estimate = estimator(seen)
        values["psnr-estimated"].append(psnr(estimate, x).cpu())
        values["ssim-estimated"].append(ssim(estimate, x).cpu())
        if observer is not None:
            y = labels[idx].to(device)
            hits["recognisability-estimated"].append((observer(estimate).argmax(1) == y).cpu())
        if protected.shape == x.shape:  # a 6-channel encryption has no PSNR to the RGB image
            values["psnr-protected"].append(psnr(protected, x).cpu())
            values["ssim-protected"].append(ssim(protected, x).cpu())
            if observer is not None:
                hits["recognisability-protected"].append((observer(protected).argmax(1) == y).cpu())
    per_image = {k: torch.cat(v) for k, v in values.items() if v}
    result = {**{k: summary(v) for k, v in per_image.items()},
              **{k: torch.cat(v).double().mean().item() for k, v in hits.items() if v}}
    return {**result, "per-image": {k: v.tolist() for k, v in per_image.items()}}


def load_inverse_net(path: str | Path) -> nn.Module:
    """The attacker's selected inverse network (``best.pt`` of :func:`train_attack`), in eval mode."""
    blob = load_checkpoint(path, "inverse_net")
    estimator = UNet(blob["base"], blob["depth"], in_channels=blob["in_channels"], arch=blob.get("unet-arch", "ours"))
    estimator.load_state_dict(blob["state_dict"])
    return estimator.eval()


@torch.no_grad()
def attack_columns(estimator: nn.Module, target: Target, x: torch.Tensor, name: str, attacker: str = "ITN"
                   ) -> tuple[list[torch.Tensor], list[str], list[list[str]]]:
    """Fig. 6's two columns for one target: protected images (as the provider holds them, :func:`target_views`)
    and the ``attacker``'s estimates, each with its PSNR to x ((n, 3, H, W) in [0, 1])."""
    estimator.eval()
    protected, seen = target_views(target, x)
    estimate = estimator(seen)
    rgb = protected.shape[1] == 3  # a 6-channel encryption: its first 3 channels are shown, no PSNR
    prefix = f"{name}: " if name else ""
    return ([protected[:, :3].cpu(), estimate.cpu()],
            [f"{prefix}protected" + ("" if rgb else " (first 3 of 6 channels)"), f"{prefix}{attacker} estimate"],
            [[f"{v:.1f} dB" for v in psnr(protected, x).tolist()] if rgb else [],
             [f"{v:.1f} dB" for v in psnr(estimate, x).tolist()]])


def save_fig6(x: torch.Tensor, columns: list[tuple[list, list, list]], path: Path, title: str) -> Path:
    """The paper's Fig. 6: plain images, then each target's protected / estimated columns, PSNR under each image."""
    from pp_flower.report import save_pairs_grid

    images, labels, captions = [x.cpu()], ["plain"], [[]]
    for imgs, labs, caps in columns:
        images += imgs
        labels += labs
        captions += caps
    return save_pairs_grid(images, labels, path, captions, title=title)


def save_attack_grid(estimator: nn.Module, target: Target, images: torch.Tensor, path: Path, name: str,
                     device: str = "cpu", attacker: str = "ITN") -> Path:
    """Fig. 6 for one target (written beside its ``attack.json``)."""
    x = to_float(images).to(device)
    title = f"ITN-Attack on {name}" if attacker == "ITN" else f"{attacker} attack on {name}"
    wire, view = _describe_wire(target)
    if wire is not None:
        title += f" ({wire} wire{', logit input' if view == 'logit' else ''})"
    return save_fig6(x, [attack_columns(estimator, target, x, "", attacker)], path, title)


# --- every attacker on a target side by side (issue #22) ----------------------------------------------------------
CRITERIA = ("psnr-median", "ssim-median", "observer-accuracy")  # higher = a stronger attack, for each


def read_attack_results(out_dir: str | Path) -> dict[str, dict]:
    """Every finished attack under ``out_dir`` (``<tag>/attack.json``, tag = its folder name) → its result, with
    ``target-name``, ``attacker`` and ``wire`` filled in for results written before they were recorded (tag
    ``<target>-ITN`` / ``<target>-ITN+feat``; those attackers saw the target's own output: ``float32``)."""
    results = {}
    for done in sorted(Path(out_dir).glob("*/attack.json")):
        tag, r = done.parent.name, json.loads(done.read_text())
        if "attacker" not in r or "target-name" not in r:
            name, attacker = tag.rsplit("-", 1) if tag.endswith(("-ITN", "-ITN+feat")) else (tag, "ITN")
            r = {**r, "target-name": r.get("target-name", name), "attacker": r.get("attacker", attacker)}
        r.setdefault("wire", "float32")
        r.setdefault("input", "image")
        results[tag] = r
    return results


def attacker_row(result: dict, tag: str = "") -> dict:
    """One attacker's line of the summary: median PSNR (dB) and SSIM of its estimates, the observer's accuracy on
    them (None without an observer), what it saw (wire, input) and how it was trained."""
    finite = lambda v: v if v is not None and math.isfinite(v) else None  # noqa: E731
    return {"psnr-median": finite(result["psnr-estimated"]["median"]),
            "ssim-median": finite(result["ssim-estimated"]["median"]),
            "observer-accuracy": result.get("recognisability-estimated"),
            "wire": result.get("wire"), "input": result.get("input", "image"),
            "method": result.get("method", (result.get("config") or {}).get("method", "itn")), "result": tag}


def best_attack(rows: dict[str, dict]) -> dict[str, dict | None]:
    """For each criterion of :data:`CRITERIA` the strongest attacker: ``{"attacker": name, "value": v}`` (the
    largest value; ties: the first name in sorted order), None where no attacker has a value (no observer)."""
    best: dict[str, dict | None] = {}
    for criterion in CRITERIA:
        scored = [(row[criterion], name) for name, row in sorted(rows.items()) if row.get(criterion) is not None]
        if scored:
            value = max(v for v, _ in scored)
            best[criterion] = {"attacker": next(n for v, n in scored if v == value), "value": value}
        else:
            best[criterion] = None
    return best


def summarise_attacks(results: dict[str, dict]) -> dict[str, dict]:
    """Per target (and wire), every attacker side by side and the strongest by each criterion.

    ``results``: tag → attack.json result (:func:`read_attack_results`). Returns target → {"wire", "protected":
    the provider's images' median PSNR/SSIM and the observer's accuracy on them, "attackers": attacker →
    :func:`attacker_row`, "best": :func:`best_attack`}. A target attacked under two wires (results of
    different runs in one folder) gets one entry per wire, named ``<target> [<wire>]``: attackers on different
    tensors are never compared.
    """
    groups: dict[tuple[str, str | None], dict[str, tuple[str, dict]]] = {}
    for tag, r in results.items():
        groups.setdefault((r["target-name"], r.get("wire")), {})[r["attacker"]] = (tag, r)
    names = [name for name, _ in groups]
    out = {}
    for (name, wire), attackers in sorted(groups.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        rows = {a: attacker_row(r, tag) for a, (tag, r) in sorted(attackers.items())}
        first = next((r for _, (_, r) in sorted(attackers.items()) if "psnr-protected" in r), None)
        protected = ({"psnr-median": first["psnr-protected"]["median"],
                      "ssim-median": first["ssim-protected"]["median"],
                      "observer-accuracy": first.get("recognisability-protected")} if first else None)
        out[name if names.count(name) == 1 else f"{name} [{wire}]"] = {
            "wire": wire, "protected": protected, "attackers": rows, "best": best_attack(rows)}
    return out
