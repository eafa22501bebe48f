"""``ppflower reproduce --preset cpu|paper``: the paper's Table I and Figs. 5–7, measured by the product itself.

Stages, each resumable (a finished stage is skipped; an interrupted one continues from its last checkpoint,
except a Flower simulation, which restarts):

1. ``psi-<arch>``            the provider trains ψ on plain images;
2. ``transform-<arch>-a<α>`` h_θ for every α through the Flower app (``flower-simulation --app sims.main``);
3. ``gan``                   the GAN-based transformation's generator;
4. ``psi-<arch>-<baseline>`` ψ trained on Tanaka-, pixel- (single key, per-image keys) and GAN-protected images;
5. ``attack-<row>``          the ITN-Attack on every protected row (ResNet-20 column's transforms);
6. report                    ``table1.md`` / ``table1.json`` with the paper's numbers beside the measured ones,
                             ``fig5_alpha.png``, ``fig6_attack.png``, ``fig7_psnr_boxplot.png``.

Checkpoints go to ``--workdir`` (default ``runs/reproduce-<preset>``); the small results (tables, figures,
per-stage JSON, wall times) to ``--out`` (default ``results/<preset>``).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from pp_flower.config import format_run_config
from pp_flower.errors import PPFlowerError

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
    "cpu": Preset(  # sized to finish in one ≤ 150-min run on a 2-core AVX2 box (≈ 290 ψ img/s, 58 h_θ img/s)
        name="cpu", archs=("resnet20",), alphas=(0.0, 0.005, 0.01, 0.05), baselines=("tanaka", "pixel"),
        psi={"epochs": 8, "batch_size": 128, "lr": 0.15, "schedule": "onecycle", "label_smoothing": 0.1,
             "fast": True},
        baseline_psi={"epochs": 1},
        observer={"epochs": 3, "batch_size": 128, "lr": 0.15, "schedule": "onecycle", "label_smoothing": 0.1,
                  "fast": True, "seed": 1},
        strong_weights=(0.01, 0.1, 1.0), budget_epochs=(1, 2, 4),
        transform={"epochs": 4, "batch-size": 64, "lr": 0.03, "unet-base": 16, "unet-arch": "paper",
                   "limit-train": 4_096, "eval-chunk": 500, "keep-epochs": "1,2,4"},
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
            "JPEG-q75 re-encoded CIFAR-10 (../shared/data); the paper used the original PNGs.",
        )),
    "smoke": Preset(  # the pipeline end to end in a few minutes: for tests, not for numbers
        name="smoke", alphas=(0.005, 0.1), psi={"epochs": 1}, observer={"epochs": 1, "seed": 1},
        strong_weights=(0.01, 0.1), budget_alphas=(0.005,), budget_epochs=(1,), limit_train=512, limit_eval=200,
        transform={"epochs": 1, "batch-size": 64, "unet-base": 8, "limit-train": 256, "eval-chunk": 200,
                   "keep-epochs": "1"},
        gan={"epochs": 1, "unet_base": 8, "batch_size": 64}, gan_limit_train=256,
        attack={"epochs": 1, "unet_base": 8, "batch_size": 64}, attack_limit_train=256,
        deviations=("Smoke-test scale: every number here is meaningless.",)),
}


def _row_key(alpha: float) -> str:
    return f"alpha{alpha:g}"


def run_child(argv: list[str]) -> int:
    """Run a child command (a stage's flower-simulation) to its end; its exit code.

    An interrupt of this process (Ctrl-C, SIGTERM, SIGHUP: sims.signals) is passed on to the child as Ctrl-C and
    waited for, so no simulation outlives ``reproduce`` (and the child gets SIGTERM should this process be killed
    outright). A child that was itself interrupted (exit 130 or a signal) interrupts this run too: it is reported
    as interrupted, not as failed."""
    import signal

    from sims import signals

    child = subprocess.Popen(argv, preexec_fn=signals.die_with_parent, env={**os.environ, signals.NESTED: "1"})
    try:
        returncode = child.wait()
    except BaseException:
        signals.stop_child(child)
        raise
    if returncode in (130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGHUP):
        signals.mark_interrupted()
        raise KeyboardInterrupt
    return returncode


class StopAfter(Exception):
    """``--until STAGE`` reached: the run stops there, resumable by the same command without ``--until``."""


class Reproduction:
    def __init__(self, preset: Preset, out: Path, workdir: Path, data_dir=None, vgg_weights=None,
                 device: str = "cpu", log=print, until: str = ""):
        self.preset, self.out, self.work, self.until = preset, Path(out), Path(workdir), until
        self.data_dir, self.vgg_weights, self.device, self.log = data_dir, vgg_weights, device, log
        from pp_flower.checkpoints import ensure_writable_dir

        ensure_writable_dir(self.out, "--out")
        ensure_writable_dir(self.work, "--workdir")
        self.stages_file = self.out / "stages.json"
        self.stages = json.loads(self.stages_file.read_text()) if self.stages_file.exists() else {}
        for name, entry in self.stages.items():  # stages.json of 0.1 spelt its keys with underscores
            self.stages[name] = {k.replace("_", "-"): v for k, v in entry.items()}
        self._splits = {}

    # --- bookkeeping -------------------------------------------------------------------------------------
    def splits(self, limit_train: int):
        from pp_flower.data import load_splits

        key = limit_train or 0
        if key not in self._splits:
            self._splits[key] = load_splits(self.data_dir, limit_train=limit_train or None,
                                            limit_eval=self.preset.limit_eval or None)
        return self._splits[key]

    def data_fingerprint(self) -> str:
        """The images every stage draws from (their pixels: pp_flower.data.dataset_fingerprint), once per run."""
        if not hasattr(self, "_data_fp"):
            from pp_flower.data import dataset_fingerprint

            splits = self.splits(0)
            self._data_fp = dataset_fingerprint(splits.train_all.images, splits.test_all.images)
        return self._data_fp

    def stage(self, name: str, done: Path, run, command: str = "", key: dict | None = None) -> None:
        """Run ``run()`` unless ``done`` exists; record its wall time (summed over resumed attempts).

        ``key`` is what defines the stage's result (its settings and the data's fingerprint), kept beside ``done``
        as ``stage-key.json``: a done stage is reused only for the same key, else refused naming what changed.
        A stage done before keys were kept (no stage-key.json) is reused as it is."""
        from pp_flower.checkpoints import describe_changes, key_changes

        key = {**(key or {}), "data": self.data_fingerprint()}
        key_file = done.parent / "stage-key.json"
        if done.exists():
            if key_file.exists():
                old = json.loads(key_file.read_text())
                changed, _ = key_changes(old, key)
                if changed:
                    raise PPFlowerError(f"Stage {name} in {done.parent} was computed with other settings or data "
                                        f"({describe_changes(old, key, changed)}); use another --workdir and --out "
                                        f"for this run, or delete {done.parent} to recompute the stage.")
            self.log(f"[dim]✓ {name}: done ({done})[/]")
            self._maybe_stop(name)
            return
        self.log(f"[bold]▶ {name}[/]")
        if command and self.stages.get(name, {}).get("command") not in (None, portable(command)):
            del self.stages[name]  # another recipe's wall time (an older preset) is not this stage's
        started = time.time()
        try:
            run()
        finally:
            entry = self.stages.setdefault(name, {"wall-seconds": 0.0, "attempts": 0})
            entry["wall-seconds"] += time.time() - started
            entry["attempts"] += 1
            entry["finished"] = done.exists()
            if command:
                entry["command"] = portable(command)
            self.stages_file.write_text(json.dumps(self.stages, indent=2))
        if not done.exists():
            raise PPFlowerError(f"Stage {name} ended without writing {done}.")
        key_file.write_text(json.dumps(key, indent=2))
        self._maybe_stop(name)

    def _maybe_stop(self, name: str) -> None:
        if self.until == name:
            raise StopAfter(name)

    # --- stages ------------------------------------------------------------------------------------------
    def classifier(self, arch: str, baseline: str = "", transform: str = "", role: str = "psi") -> Path:
        """ψ (``role="psi"``), or the independent observer that measures recognisability (``role="observer"``)."""
        from pp_flower.classifier import ClassifierConfig, train_classifier

        name = f"{role}-{arch}" + (f"-{baseline}" if baseline else "")
        out = self.work / name
        recipe = self.preset.observer if role == "observer" else {
            **self.preset.psi, **(self.preset.baseline_psi if baseline else {})}
        cfg = ClassifierConfig(arch=arch, baseline=baseline, key=BASELINE_KEYS.get(baseline, 0), transform=transform,
                               **recipe)
        defaults = ClassifierConfig()
        options = "".join(f" --{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items()
                          if k in ("epochs", "batch_size", "lr", "seed", "schedule", "label_smoothing")
                          and v != getattr(defaults, k))
        cmd = (f"ppflower train-classifier --model {arch}{options}" + (" --fast" if cfg.fast else "")
               + (f" --limit-train {self.preset.limit_train}" if self.preset.limit_train else "")
               + (f" --limit-eval {self.preset.limit_eval}" if self.preset.limit_eval else "")
               + (f" --baseline {baseline} --key {cfg.key}" if baseline else "")
               + (f" --transform {transform}" if transform else "") + f" --out {out}")
        key = {**{k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"},
               "limit-train": self.preset.limit_train, "limit-eval": self.preset.limit_eval}
        self.stage(name, out / "metrics.json",
                   lambda: train_classifier(self.splits(self.preset.limit_train), out, cfg, self.device, self.log),
                   cmd, key)
        return out

    def transform(self, arch: str, alpha: float, classifier: Path) -> Path:
        run_dir = self.work / f"transform-{arch}-a{alpha:g}"
        run_config = {**self.preset.transform, "alpha": alpha, "classifier": str((classifier / "best.pt").resolve()),
                      "run-dir": str(run_dir.resolve()), "limit-eval": self.preset.limit_eval,
                      "num-threads": max(1, (os.cpu_count() or 2) // max(1, self.preset.users)),
                      "provider-device": self.device, "user-device": self.device}
        if self.data_dir:
            run_config["data-dir"] = str(Path(self.data_dir).resolve())
        if self.vgg_weights:
            run_config["vgg-weights"] = str(Path(self.vgg_weights).resolve())
        rc = format_run_config(run_config)
        gpus = 1.0 / self.preset.users if self.device.startswith("cuda") else 0.0
        argv = [sys.executable, "-m", "sims.flower_simulation", "--app", "sims.main", "--num-supernodes",
                str(self.preset.users), "--num-gpus", str(gpus), "--run-config", rc]

        def run() -> None:
            returncode = run_child(argv)  # every path above is absolute: the caller's directory does not matter
            if returncode != 0:
                raise PPFlowerError(f"The Flower simulation for α={alpha:g} failed (exit {returncode}).")

        from pp_flower.user import LiveUser

        ignore = {*LiveUser.MECHANICS, "classifier", "data-dir", "vgg-weights"}  # ψ's and the data's keys cover them
        key = {"users": self.preset.users, **{k: v for k, v in run_config.items() if k not in ignore}}
        self.stage(f"transform-{arch}-a{alpha:g}", run_dir / "run.json", run,
                   f"flower-simulation --app sims.main --num-supernodes {self.preset.users} --run-config {shlex.quote(rc)}",
                   key)
        return run_dir

    def gan(self) -> Path:
        from pp_flower.baselines.gan import GanConfig, train_gan_transform

        out = self.work / "gan"
        cfg = GanConfig(key=GAN_TARGET_KEY, **self.preset.gan)
        self.stage("gan", out / "metrics.json",
                   lambda: train_gan_transform(self.splits(self.preset.gan_limit_train), out, cfg, self.device,
                                               self.log),
                   f"ppflower train-gan --epochs {cfg.epochs} --unet-base {cfg.unet_base} --key {cfg.key}"
                   + (f" --limit-train {self.preset.gan_limit_train}" if self.preset.gan_limit_train else "")
                   + f" --out {out}", {**asdict(cfg), "limit-train": self.preset.gan_limit_train})
        return out

    def attack(self, row: str, target, target_id: str, perceptual: float = 0.0, stage: str = "") -> Path:
        """The ITN-Attack on one row (``perceptual`` > 0: the stronger attacker), with recognisability."""
        from pp_flower.attack import AttackConfig, target_fingerprint, train_attack

        stage = stage or f"attack-{row}" + (f"-strong-w{perceptual:g}" if perceptual else "")
        out = self.work / stage
        cfg = AttackConfig(**{**self.preset.attack, "perceptual": perceptual})
        observer_path = self.work / f"observer-{self.preset.archs[0]}" / "best.pt"
        observer = self._observer(observer_path)
        self.stage(stage, out / "attack.json",
                   lambda: train_attack(target, self.splits(self.preset.attack_limit_train), out, cfg, self.device,
                                        name=ROW_NAMES.get(row, row), log=self.log, target_id=target_id,
                                        observer=(observer, target_fingerprint(observer_path))),
                   f"ppflower attack ... --epochs {cfg.epochs} --unet-base {cfg.unet_base} "
                   + (f"--strong {perceptual:g} " if perceptual else "")
                   + f"--limit-train {self.preset.attack_limit_train} --out {out}",
                   {"target": target_id, **{k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"},
                    "limit-train": self.preset.attack_limit_train, "limit-eval": self.preset.limit_eval,
                    "observer": target_fingerprint(observer_path)})
        return out

    def _observer(self, path: Path):
        from pp_flower.checkpoints import load_classifier

        if not hasattr(self, "_observer_net"):
            self._observer_net = load_classifier(path)[0].eval()
        return self._observer_net

    @torch.no_grad()
    def protected_accuracy(self, psi: Path, net) -> float:
        """ψ's test accuracy on h_θ(x) in this process (the Flower app's is proven equal; the budget curve's
        intermediate h_θ never went through a test round)."""
        from pp_flower.checkpoints import load_classifier
        from pp_flower.data import to_float

        model = load_classifier(psi / "best.pt")[0].eval()
        test = self.splits(self.preset.attack_limit_train).test
        correct = 0
        for idx in torch.split(torch.arange(len(test)), 500):
            correct += (model(net(to_float(test.images[idx]))).argmax(1) == test.labels[idx]).sum().item()
        return correct / len(test)

    # --- the whole thing ---------------------------------------------------------------------------------
    def run(self) -> dict:
        from pp_flower.attack import network_target, target_fingerprint
        from pp_flower.baselines import BASELINES
        from pp_flower.checkpoints import load_transform_net

        p = self.preset
        started = time.time()
        columns: dict[str, dict[str, dict]] = {}
        transforms: dict[str, Path] = {}
        first = p.archs[0]

        def h_target(path: Path):
            return network_target(load_transform_net(path)[0], self.device), target_fingerprint(path)

        # the science first: ψ, the observer, h_θ per α and its attacks; the baselines after
        psis = {arch: self.classifier(arch) for arch in p.archs}
        self.classifier(first, role="observer")
        for arch in p.archs:
            col = columns.setdefault(arch, {})
            col["plain"] = {"accuracy": _json(psis[arch] / "metrics.json")["test-accuracy"]}
            for alpha in p.alphas:
                run_dir = self.transform(arch, alpha, psis[arch])
                user = _json(run_dir / "user-0" / "metrics.json")
                col[_row_key(alpha)] = {"accuracy": user["test-accuracy"],
                                        "accuracy-per-user": [
                                            _json(d / "metrics.json")["test-accuracy"]
                                            for d in sorted(run_dir.glob("user-*"))]}
                if arch == first:
                    transforms[_row_key(alpha)] = run_dir / "user-0" / "best.pt"
        attacks = {row: self.attack(row, *h_target(path)) for row, path in transforms.items()}
        strong = self.strong_attacks(transforms, h_target)
        budget = self.budget_curve(psis[first], h_target)

        for arch in p.archs:
            col = columns[arch]
            for baseline in p.baselines:
                generator = ""
                if baseline == "gan":
                    generator = str(self.gan() / "transform.pt")
                    transforms.setdefault("gan", Path(generator))
                psi_b = self.classifier(arch, baseline, generator)
                col[baseline] = {"accuracy": _json(psi_b / "metrics.json")["test-accuracy"],
                                 "key": BASELINE_KEYS.get(baseline, GAN_TARGET_KEY if baseline == "gan" else None)}
        if "gan" in transforms:
            attacks["gan"] = self.attack("gan", *h_target(transforms["gan"]))
        for baseline in p.baselines:
            if baseline in BASELINES:
                attacks[baseline] = self.attack(baseline, BASELINES[baseline](BASELINE_KEYS[baseline]),
                                                f"{baseline}:key{BASELINE_KEYS[baseline]}")
        return self.report(columns, attacks, strong, budget, transforms, time.time() - started)

    def strong_attacks(self, transforms: dict[str, Path], h_target) -> dict[str, Path]:
        """The stronger attacker on every α row, its feature-loss weight chosen on one row's validation MSE."""
        p = self.preset
        alpha_rows = [r for r in transforms if r.startswith("alpha")]
        if not p.strong_weights or p.strong_row not in transforms:
            return {}
        sweep = {w: self.attack(p.strong_row, *h_target(transforms[p.strong_row]), perceptual=w)
                 for w in p.strong_weights}
        val = {w: min(h["val-loss"] for h in _json(path / "attack.json")["history"]) for w, path in sweep.items()}
        best = min(val, key=val.get)
        (self.out / "strong_sweep.json").write_text(json.dumps(
            {"row": p.strong_row, "val-mse": {f"{w:g}": v for w, v in val.items()}, "chosen": best}, indent=2))
        self.log(f"Stronger attacker: feature-loss weight {best:g} (validation MSE {val[best]:.5f} on {p.strong_row})")
        return {row: sweep[best] if row == p.strong_row else
                self.attack(row, *h_target(transforms[row]), perceptual=best) for row in alpha_rows}

    def budget_curve(self, psi: Path, h_target) -> dict:
        """Test accuracy, protected PSNR and the ITN-Attack after 1, 2, 4, … epochs of h_θ (snapshots of the
        α rows' runs, kept with run-config ``keep-epochs``)."""
        from pp_flower.checkpoints import load_transform_net

        p, arch = self.preset, self.preset.archs[0]
        curve: dict = {}
        for alpha in p.budget_alphas:
            if alpha not in p.alphas:
                continue
            points = []
            for epoch in p.budget_epochs:
                path = self.work / f"transform-{arch}-a{alpha:g}" / "user-0" / f"epoch-{epoch}.pt"
                if not path.exists():
                    raise PPFlowerError(f"{path} is missing: the α = {alpha:g} run did not keep epoch {epoch} "
                                        f"(run-config keep-epochs).")
                target, target_id = h_target(path)
                best = self.work / f"transform-{arch}-a{alpha:g}" / "user-0" / "best.pt"
                if _same_weights(path, best):  # the snapshot is the row's selected h_θ: its attack is done
                    out = self.attack(_row_key(alpha), *h_target(best))
                else:
                    out = self.attack(f"budget-a{alpha:g}-e{epoch}", target, target_id,
                                      stage=f"attack-budget-a{alpha:g}-e{epoch}")
                result = _json(out / "attack.json")
                points.append({"epoch": epoch,
                               "test-accuracy": self.protected_accuracy(psi, load_transform_net(path)[0]),
                               **{k: result[k] for k in ("psnr-protected", "ssim-protected", "psnr-estimated",
                                                         "ssim-estimated", "recognisability-protected",
                                                         "recognisability-estimated") if k in result}})
            curve[f"{alpha:g}"] = points
        if curve:
            plain = _json(psi / "metrics.json")["test-accuracy"]
            (self.out / "budget_curve.json").write_text(json.dumps({"plain-accuracy": plain, "alphas": curve},
                                                                   indent=2))
            from pp_flower.report import save_budget_curve

            save_budget_curve(curve, plain, self.out / "fig_budget_curve.png")
        return curve

    # --- report ------------------------------------------------------------------------------------------
    def report(self, columns: dict, attacks: dict[str, Path], strong: dict[str, Path], budget: dict,
               transforms: dict[str, Path], wall: float) -> dict:
        from pp_flower.report import save_frontier, save_psnr_boxplot

        p = self.preset
        rows = ["plain", *(b for b in ("tanaka", "pixel", "pixel-per-image", "gan") if b in p.baselines),
                *(_row_key(a) for a in p.alphas)]
        attack_results = {row: _json(path / "attack.json") for row, path in attacks.items()}
        table = []
        for row in rows:
            entry = {"row": row, "method": ROW_NAMES[row]}
            for arch in p.archs:
                measured = columns[arch][row]["accuracy"]
                entry[arch] = {"measured": round(100 * measured, 2), "paper": PAPER_ACCURACY[row][arch]}
                if "key" in columns[arch][row]:
                    entry["key"] = columns[arch][row]["key"]
                if "accuracy-per-user" in columns[arch][row]:
                    entry[arch]["per-user"] = [round(100 * a, 2) for a in columns[arch][row]["accuracy-per-user"]]
            if row in attack_results:
                r = attack_results[row]
                entry["protected-psnr"] = r.get("psnr-protected")
                entry["protected-ssim"] = r.get("ssim-protected")
                entry["itn-psnr"] = r["psnr-estimated"]
                entry["itn-ssim"] = r["ssim-estimated"]
                entry["recognisability-protected"] = r.get("recognisability-protected")
                entry["recognisability-itn"] = r.get("recognisability-estimated")
                # the better of the paper's attacker and the stronger one (higher median PSNR)
                best = r
                if row in strong:
                    s = _json(strong[row] / "attack.json")
                    entry["strong-psnr"], entry["strong-ssim"] = s["psnr-estimated"], s["ssim-estimated"]
                    entry["strong-weight"] = s["config"]["perceptual"]
                    if s["psnr-estimated"]["median"] > r["psnr-estimated"]["median"]:
                        best = s
                    entry["recognisability-best-attack"] = max(r.get("recognisability-estimated", 0.0),
                                                               s.get("recognisability-estimated", 0.0))
                else:
                    entry["recognisability-best-attack"] = r.get("recognisability-estimated")
                entry["best-attack-psnr"] = max(r["psnr-estimated"]["median"], best["psnr-estimated"]["median"])
                entry["best-attack-ssim"] = max(r["ssim-estimated"]["median"], best["ssim-estimated"]["median"])
            table.append(entry)

        self.copy_stage_outputs(columns, {**attacks, **{f"{row}-strong": path for row, path in strong.items()}})
        total_wall = sum(s["wall-seconds"] for s in self.stages.values())
        meta = {"preset": asdict(p), "command": " ".join(["ppflower", "reproduce", "--preset", p.name]),
                "commit": _git_commit(), "machine": _machine(), "device": self.device,
                "wall-seconds-all-stages": round(total_wall, 1), "wall-seconds-this-invocation": round(wall, 1),
                "stages": self.stages, "data": portable(str(self.data_dir or "torchvision CIFAR-10")),
                "observer-accuracy": _json(self.work / f"observer-{p.archs[0]}" / "metrics.json")["test-accuracy"]}
        (self.out / "table1.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2))
        (self.out / "table1.md").write_text(_markdown(table, p, meta))
        self.log(f"Table I → {self.out / 'table1.md'}")

        boxes = {}
        for row in rows:
            if row in attack_results:
                per = attack_results[row]["per-image"]
                if "psnr-protected" in per:
                    boxes[f"{row}\nprotected"] = per["psnr-protected"]
                boxes[f"{row}\nITN estimate"] = per["psnr-estimated"]
        save_psnr_boxplot(boxes, self.out / "fig7_psnr_boxplot.png",
                          title="PSNR to the plain test images: protected images and ITN-Attack estimates")
        save_frontier(table, p.archs[0], meta["observer-accuracy"], self.out / "fig_frontier.png")
        self.figures(transforms, attacks)
        return {"meta": meta, "rows": table, "budget": budget}

    def copy_stage_outputs(self, columns: dict, attacks: dict[str, Path]) -> None:
        """The small per-stage JSON files next to the table, so every cell can be traced to its source."""
        def copy(src: Path, dest: Path) -> None:  # with this machine's paths made relative to the repo
            dest.write_text(portable(src.read_text()))

        for d in sorted(self.work.glob("psi-*")) + sorted(self.work.glob("observer-*")) + sorted(self.work.glob("gan")):
            if (d / "metrics.json").exists():
                copy(d / "metrics.json", self.out / f"{d.name}.json")
        for d in sorted(self.work.glob("transform-*")):
            if not (d / "run.json").exists():  # a stage still running (or interrupted): nothing to copy yet
                continue
            dest = self.out / d.name
            dest.mkdir(exist_ok=True)
            copy(d / "run.json", dest / "run.json")
            for user in sorted(d.glob("user-*")):
                copy(user / "metrics.json", dest / f"{user.name}.json")
        (self.out / "attack").mkdir(exist_ok=True)
        for row, path in attacks.items():
            copy(path / "attack.json", self.out / "attack" / f"{row}.json")

    @torch.no_grad()
    def figures(self, transforms: dict[str, Path], attacks: dict[str, Path]) -> None:
        """Fig. 5 (protected images per α) and Fig. 6 (plain / protected / estimated with PSNR)."""
        from pp_flower.attack import attack_columns, load_inverse_net, network_target, save_fig6
        from pp_flower.baselines import BASELINES
        from pp_flower.checkpoints import load_transform_net
        from pp_flower.data import to_float
        from pp_flower.metrics import psnr
        from pp_flower.report import save_pairs_grid

        x = to_float(self.splits(self.preset.attack_limit_train).test.images[:8])
        alpha_rows = [_row_key(a) for a in self.preset.alphas if _row_key(a) in transforms]
        images, labels, captions = [x], ["plain"], [[]]
        for row in alpha_rows:
            protected = load_transform_net(transforms[row])[0](x)
            images.append(protected)
            labels.append(f"α = {row[5:]}")
            captions.append([f"{v:.1f} dB" for v in psnr(protected, x).tolist()])
        save_pairs_grid(images, labels, self.out / "fig5_alpha.png", captions,
                        title="Fig. 5: protected images x̂ = h_θ(x) per α (PSNR to the plain image)")

        columns = []
        for row, path in attacks.items():
            target = (network_target(load_transform_net(transforms[row])[0]) if row in transforms
                      else BASELINES[row](BASELINE_KEYS[row]))
            columns.append(attack_columns(load_inverse_net(path / "best.pt"), target, x, ROW_NAMES[row]))
        save_fig6(x, columns, self.out / "fig6_attack.png",
                  "Fig. 6: plain / protected / ITN-Attack estimate (PSNR to the plain image)")


def _same_weights(a: Path, b: Path) -> bool:
    from pp_flower.checkpoints import load_checkpoint

    sa, sb = load_checkpoint(a, "transform_net")["state_dict"], load_checkpoint(b, "transform_net")["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _json(path: Path) -> dict:
    if not path.exists():
        raise PPFlowerError(f"{path} is missing; rerun `ppflower reproduce` to finish that stage.")
    return json.loads(path.read_text())


def _fmt(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(v, row: str) -> str:
    return ("—" if row == "plain" else "n/a") if v is None else f"{100 * v:.1f}"


def _markdown(table: list[dict], p: Preset, meta: dict) -> str:
    lines = [f"# Table I — preset `{p.name}`", "",
             "Test accuracy of ψ on each kind of image (%), measured by this product on the same data, beside the "
             "paper's Table I; protected-image PSNR and the ITN-Attack's estimate PSNR (medians over the test "
             "images, dB; lower = better protection); SSIM lies in [−1, 1] (1 = the plain image's structure, 0 = "
             "none, < 0 = inverted structure, e.g. a negative-like image). *Best attack*: the better of the paper's ITN-Attack and a "
             "stronger one with a VGG16 feature loss (weight chosen on validation, `strong_sweep.json`). "
             "*Recognisable*: test accuracy (%) of an independent classifier trained on plain images (the "
             "observer), on the protected images and on the better attack's estimates; chance is 10 %, plain "
             f"images give the observer's {100 * meta.get('observer-accuracy', float('nan')):.1f} %.", "",
             "## Deviations from the paper", "", *(f"- {d}" for d in p.deviations), "",
             "## Table", ""]
    head = ["Method"]
    for arch in p.archs:
        name = {"resnet20": "ResNet-20", "vgg16": "VGG16-BN"}[arch]
        head += [f"{name} measured", f"{name} paper"]
    head += ["protected PSNR", "ITN-Attack PSNR", "ITN-Attack SSIM", "best attack PSNR / SSIM",
             "recognisable: protected", "recognisable: best attack"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in table:
        key = e.get("key")
        cells = [e["method"] + ("" if key is None else f" (trained toward key {key}; G has no key)"
                                if e["row"] == "gan" else f" (key {key})")]
        for arch in p.archs:
            cells += [_fmt(e[arch]["measured"]), _fmt(e[arch]["paper"])]
        prot = e.get("protected-psnr")
        cells += [("—" if e["row"] == "plain" else "n/a (6 channels)") if prot is None else _fmt(prot["median"]),
                  _fmt(e["itn-psnr"]["median"]) if "itn-psnr" in e else "—",
                  _fmt(e["itn-ssim"]["median"], 3) if "itn-ssim" in e else "—",
                  f"{_fmt(e['best-attack-psnr'])} / {_fmt(e['best-attack-ssim'], 3)}" if "best-attack-psnr" in e
                  else "—",
                  _pct(e.get("recognisability-protected"), e["row"]), _pct(e.get("recognisability-best-attack"),
                                                                           e["row"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Paper columns: the numbers printed in the paper's Table I; — where the paper gives none. "
              "Every measured cell comes from this run's JSON files (`table1.json`, `attack/*.json`).", "",
              "## Provenance", "",
              f"- Command: `{meta['command']}`",
              f"- Commit: `{meta['commit']}`",
              f"- Machine: {meta['machine']} (device: {meta['device']})",
              f"- Wall time, all stages: {meta['wall-seconds-all-stages'] / 60:.1f} min "
              f"(per stage in `stages.json`)",
              f"- Data: {meta['data']}", ""]
    return "\n".join(lines)


REPO = Path(__file__).resolve().parent.parent


def portable(text: str) -> str:
    """``text`` with this checkout's absolute paths made relative to the repo (its parent as ``..``): results
    carry provenance, not one machine's directory layout."""
    return text.replace(f"{REPO}{os.sep}", "").replace(f"{REPO.parent}{os.sep}", f"..{os.sep}")


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent.parent).stdout.strip()
        return (sha or "unknown") + (" (+ uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import flwr

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}, flwr {flwr.__version__}")


def reproduce(preset: str, out: Path | None = None, workdir: Path | None = None, data_dir=None, vgg_weights=None,
              device: str = "cpu", log=print, until: str = "", **overrides) -> dict | None:
    """Run (or resume) every stage of ``preset`` and write its table and figures; ``until`` stops after that
    stage (returns None)."""
    if preset not in PRESETS:
        raise PPFlowerError(f"Unknown preset '{preset}' (known: {', '.join(PRESETS)}).")
    p = replace(PRESETS[preset], **overrides)
    if vgg_weights:
        os.environ["PPFLOWER_VGG_WEIGHTS"] = str(vgg_weights)
    repro = Reproduction(p, out or Path("results") / preset, workdir or Path("runs") / f"reproduce-{preset}",
                         data_dir, vgg_weights, device, log, until)
    try:
        return repro.run()
    except StopAfter as stop:
        log(f"Stopped after stage {stop} (--until); rerun without --until to go on.")
        return None
