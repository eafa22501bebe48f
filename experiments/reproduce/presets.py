"""The presets of ``ppflower reproduce``: which rows, columns and budgets a run measures, and the paper's numbers.

``Preset`` says what one run computes (architectures, α values, baselines, epochs, image counts); ``PRESETS``
holds the three the CLI offers (``paper``, ``cpu``, ``smoke``). ``PAPER_ACCURACY`` and ``ROW_NAMES`` are the
paper's Table I, printed beside the measured cells by :mod:`experiments.reproduce.report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALPHAS = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1)
BASELINE_KEYS = {"tanaka": 1, "pixel": 2, "pixel-per-image": 3}
GAN_TARGET_KEY = 4

# Table I of the paper (test accuracy, %); None = not in the paper's table.
PAPER_ACCURACY = {
    "plain": {"resnet20": 91.23, "vgg16": 92.23},
    "tanaka": {"resnet20": 85.18, "vgg16": 85.79},
    "pixel": {"resnet20": 90.99, "vgg16": 90.29},
    "pixel-per-image": {"resnet20": None, "vgg16": None},
    "gan": {"resnet20": None, "vgg16": None},
    "alpha0": {"resnet20": None, "vgg16": None},
    "alpha0.001": {"resnet20": None, "vgg16": None},
    "alpha0.005": {"resnet20": 91.72, "vgg16": 91.94},
    "alpha0.01": {"resnet20": 91.41, "vgg16": 91.13},
    "alpha0.05": {"resnet20": 89.63, "vgg16": 18.67},
    "alpha0.1": {"resnet20": 39.92, "vgg16": 18.99},
}
ROW_NAMES = {"plain": "Plain images (no protection)", "tanaka": "Tanaka's learnable encryption",
             "pixel": "Pixel-based encryption (one key)", "pixel-per-image": "Pixel-based encryption (per-image keys)",
             "gan": "GAN-based transformation", **{f"alpha{a:g}": f"Proposed h_θ, α = {a:g}" for a in ALPHAS}}


@dataclass
class Preset:
    name: str
    archs: tuple[str, ...] = ("resnet20",)
    alphas: tuple[float, ...] = ALPHAS
    baselines: tuple[str, ...] = ("tanaka", "pixel", "pixel-per-image", "gan")
    limit_train: int = 0          # training images for ψ (0 = all 45,000)
    limit_eval: int = 0           # validation and test images (0 = all 5,000 / 10,000)
    psi: dict = field(default_factory=lambda: {"epochs": 200})  # ClassifierConfig of ψ (plain images)
    baseline_psi: dict = field(default_factory=dict)  # overrides of ``psi`` for the baseline rows' ψ
    observer: dict = field(default_factory=lambda: {"epochs": 200, "seed": 1})  # the independent classifier
    strong_weights: tuple[float, ...] = (0.001, 0.01, 0.1)  # feature-loss weights of the stronger attacker
    strong_row: str = "alpha0.005"  # the row whose validation loss picks the weight, used on every α row
    budget_alphas: tuple[float, ...] = (0.0, 0.005)   # the budget curve: h_θ after each of budget_epochs
    budget_epochs: tuple[int, ...] = ()
    grad_noises: tuple[float, ...] = ()  # the grad-noise defence: h_θ at defence_alpha with these noise levels
    defence_alpha: float = 0.005
    users: int = 1
    transform: dict = field(default_factory=dict)   # run-config overrides of the Flower app (h_θ)
    gan: dict = field(default_factory=dict)         # GanConfig overrides
    gan_limit_train: int = 0
    attack: dict = field(default_factory=dict)      # AttackConfig overrides
    attack_limit_train: int = 0
    deviations: tuple[str, ...] = ()


PRESETS = {
    "paper": Preset(
        name="paper", archs=("resnet20", "vgg16"), budget_epochs=(1, 2, 4, 8, 16, 32, 64, 128, 200),
        transform={"epochs": 200, "batch-size": 128, "lr": 0.1, "unet-base": 64, "unet-arch": "paper"},
        gan={"epochs": 200, "unet_base": 64}, attack={"epochs": 200, "unet_base": 64},
        deviations=("JPEG-q75 re-encoded CIFAR-10 when run on ../shared/data (the paper: the original PNGs).",
                    "The GAN-based transformation follows our reading of arXiv:2006.01342 (pix2pix objective, "
                    "pixel-based encryption as the target domain, generator with a learned positional map).")),
    "cpu": Preset(  # 211 min on a 2-core bf16 box (results/cpu/stages.json); a rerun resumes
        name="cpu", archs=("resnet20",), alphas=(0.0, 0.005, 0.01, 0.05), baselines=("tanaka", "pixel"),
        psi={"epochs": 8, "batch_size": 128, "lr": 0.15, "schedule": "onecycle", "label_smoothing": 0.1,
             "fast": True},
        baseline_psi={"epochs": 1},
        observer={"epochs": 3, "batch_size": 128, "lr": 0.15, "schedule": "onecycle", "label_smoothing": 0.1,
                  "fast": True, "seed": 1},
        strong_weights=(0.01, 0.1, 1.0), budget_epochs=(1, 2, 4), grad_noises=(1.0, 4.0, 16.0),
        transform={"epochs": 4, "batch-size": 64, "lr": 0.03, "unet-base": 16, "unet-arch": "paper",
                   "limit-train": 4_096, "eval-chunk": 500, "keep-epochs": "1,2,4", "wire": "uint8",
                   "step-timeout": 600.0},  # a shared 2-core box can be slow; the timeout changes no result
        gan={"epochs": 1, "unet_base": 16, "batch_size": 64, "lr": 1e-3}, gan_limit_train=4_096,
        attack={"epochs": 2, "unet_base": 16, "batch_size": 64}, attack_limit_train=2_048,
        deviations=(
            "Only the ResNet-20 column (VGG16-BN: `--preset paper`).",
            "Baselines: Tanaka and pixel-based (one key) only; the GAN-based transformation and pixel-based "
            "encryption with per-image keys are left out for time (`ppflower train-gan` runs them).",
            "ψ (plain): 8 epochs on all 45,000 training images with a one-cycle schedule (peak lr 0.15, linear "
            "warm-up over 20 %, linear decay to 0), label smoothing 0.1, batch 128, channels-last (+ bfloat16 "
            "autocast where the CPU has native bf16) in the training step (evaluation in fp32). The paper: 200 "
            "epochs, lr 0.1 × 0.2 at 30/60/80 %.",
            "ψ of the baseline rows (Tanaka, pixel, GAN): the same recipe for 1 epoch (time), so those rows carry "
            "a much shorter-trained ψ than the plain and h_θ rows: compare them with each other, not with h_θ.",
            "α rows 0, 0.005, 0.01, 0.05 (the paper's Table I has 0.005–0.1; 0.001 and 0.1 are left out for time).",
            "h_θ: the authors' U-Net at width 16 (the paper: 64), 4 epochs of 4,096 images (256 steps; the paper: "
            "200 epochs of 45,000), batch 64, lr 0.03 × 0.2 at 30/60/80 %, one user, through the Flower app.",
            "h_θ ends in a sigmoid so x̂ is an image in [0, 1]; the authors' U-Net output is unbounded.",
            "GAN-based transformation: generator (the authors' U-Net family, width 16, with a learned positional "
            "map), 1 epoch on 4,096 images, Adam lr 1e-3 (pix2pix: 2e-4); our reading of arXiv:2006.01342.",
            "ITN-Attack: the authors' U-Net at width 16 (the paper: 64), 2 epochs (the paper: 200) on 2,048 pairs, "
            "batch 64. The stronger attacker adds a VGG16 relu2_2 feature loss; its weight is chosen on the α = "
            "0.005 row's validation MSE from 0.01, 0.1, 1 and then used on every α row.",
            "Recognisability: a second ResNet-20 (seed 1, 3 epochs, same recipe), trained only on plain images, "
            "classifies protected images and ITN estimates.",
            "The wire: x̂ travels to the provider as the 8-bit image round(255·x̂) (run-config wire=\"uint8\"), as "
            "in the paper; every attack trains and is evaluated on that 8-bit image.",
            "Label leakage: each user infers the labels of its own training images from the ∂L_class/∂x̂ it "
            "received (Li et al. 2022's direction attack, on up to 2,000 images per user); the grad-noise defence "
            "is measured on the α = 0.005 row at 3 noise levels.",
            "JPEG-q75 re-encoded CIFAR-10 (../shared/data); the paper used the original PNGs.",
        )),
    "smoke": Preset(  # the pipeline end to end in a few minutes: for tests, not for numbers
        name="smoke", alphas=(0.005, 0.1), psi={"epochs": 1}, observer={"epochs": 1, "seed": 1},
        strong_weights=(0.01, 0.1), budget_alphas=(0.005,), budget_epochs=(1,), limit_train=512, limit_eval=200,
        grad_noises=(4.0,),
        transform={"epochs": 1, "batch-size": 64, "unet-base": 8, "limit-train": 256, "eval-chunk": 200,
                   "keep-epochs": "1"},
        gan={"epochs": 1, "unet_base": 8, "batch_size": 64}, gan_limit_train=256,
        attack={"epochs": 1, "unet_base": 8, "batch_size": 64}, attack_limit_train=256,
        deviations=("Smoke-test scale: every number here is meaningless.",)),
}


def row_key(alpha: float) -> str:
    """The Table I row of the proposed h_θ at ``alpha`` (e.g. ``alpha0.005``)."""
    return f"alpha{alpha:g}"
