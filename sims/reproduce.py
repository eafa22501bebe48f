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
    psi_epochs: int = 200
    users: int = 1
    transform: dict = field(default_factory=dict)   # run-config overrides of the Flower app (h_θ)
    gan: dict = field(default_factory=dict)         # GanConfig overrides
    gan_limit_train: int = 0
    attack: dict = field(default_factory=dict)      # AttackConfig overrides
    attack_limit_train: int = 0
    deviations: tuple[str, ...] = ()


PRESETS = {
    "paper": Preset(
        name="paper", archs=("resnet20", "vgg16"), psi_epochs=200,
        transform={"epochs": 200, "batch-size": 128, "lr": 0.1, "unet-base": 64},
        gan={"epochs": 200, "unet_base": 64}, attack={"epochs": 200, "unet_base": 64},
        deviations=("JPEG-q75 re-encoded CIFAR-10 when run on ../shared/data (the paper: the original PNGs).",
                    "The GAN-based transformation follows our reading of arXiv:2006.01342 (pix2pix objective, "
                    "pixel-based encryption as the target domain, generator with a learned positional map).")),
    "cpu": Preset(
        name="cpu", archs=("resnet20",), psi_epochs=6, limit_train=20_000, limit_eval=2_000,
        transform={"epochs": 5, "batch-size": 64, "lr": 0.03, "unet-base": 16, "limit-train": 8_192,
                   "eval-chunk": 500},
        gan={"epochs": 3, "unet_base": 16, "batch_size": 64, "lr": 1e-3}, gan_limit_train=8_192,
        attack={"epochs": 3, "unet_base": 16, "batch_size": 64}, attack_limit_train=4_096,
        deviations=(
            "Only the ResNet-20 column (VGG16-BN: `--preset paper`).",
            "ψ (every row): 6 epochs on the first 20,000 of the 45,000 training images (the paper: 200 epochs, 45,000); "
            "lr ×0.2 at 30/60/80 % of the epochs as in the paper.",
            "Validation and test on 2,000 images each (the paper: 5,000 / 10,000).",
            "h_θ: U-Net width 16 (the paper: 64), 5 epochs (the paper: 200) on 8,192 images (640 steps), batch 64, "
            "lr 0.03 (the paper: 0.1, which at 640 steps pushes the images away faster than ψ's loss can follow: "
            "accuracy 20 % at α = 0.005 in a 384-step trial), one user.",
            "GAN-based transformation: generator U-Net width 16 with a learned positional map, 3 epochs on 8,192 "
            "images, Adam lr 1e-3 (pix2pix: 2e-4); our reading of arXiv:2006.01342 (pix2pix objective, pixel-based "
            "encryption as the target domain).",
            "ITN-Attack: U-Net width 16 (the paper: 64), 3 epochs (the paper: 200) on 4,096 pairs, batch 64.",
            "JPEG-q75 re-encoded CIFAR-10 (../shared/data); the paper used the original PNGs.",
        )),
    "smoke": Preset(  # the pipeline end to end in a few minutes: for tests, not for numbers
        name="smoke", alphas=(0.005, 0.1), psi_epochs=1, limit_train=512, limit_eval=200,
        transform={"epochs": 1, "batch-size": 64, "unet-base": 8, "limit-train": 256, "eval-chunk": 200},
        gan={"epochs": 1, "unet_base": 8, "batch_size": 64}, gan_limit_train=256,
        attack={"epochs": 1, "unet_base": 8, "batch_size": 64}, attack_limit_train=256,
        deviations=("Smoke-test scale: every number here is meaningless.",)),
}


def _row_key(alpha: float) -> str:
    return f"alpha{alpha:g}"


class Reproduction:
    def __init__(self, preset: Preset, out: Path, workdir: Path, data_dir=None, vgg_weights=None,
                 device: str = "cpu", log=print):
        self.preset, self.out, self.work = preset, Path(out), Path(workdir)
        self.data_dir, self.vgg_weights, self.device, self.log = data_dir, vgg_weights, device, log
        from pp_flower.checkpoints import ensure_writable_dir

        ensure_writable_dir(self.out, "--out")
        ensure_writable_dir(self.work, "--workdir")
        self.stages_file = self.out / "stages.json"
        self.stages = json.loads(self.stages_file.read_text()) if self.stages_file.exists() else {}
        self._splits = {}

    # --- bookkeeping -------------------------------------------------------------------------------------
    def splits(self, limit_train: int):
        from pp_flower.data import load_splits

        key = limit_train or 0
        if key not in self._splits:
            self._splits[key] = load_splits(self.data_dir, limit_train=limit_train or None,
                                            limit_eval=self.preset.limit_eval or None)
        return self._splits[key]

    def stage(self, name: str, done: Path, run, command: str = "") -> None:
        """Run ``run()`` unless ``done`` exists; record its wall time (summed over resumed attempts)."""
        if done.exists():
            self.log(f"[dim]✓ {name}: done ({done})[/]")
            return
        self.log(f"[bold]▶ {name}[/]")
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

    # --- stages ------------------------------------------------------------------------------------------
    def classifier(self, arch: str, baseline: str = "", transform: str = "") -> Path:
        from pp_flower.classifier import ClassifierConfig, train_classifier

        name = f"psi-{arch}" + (f"-{baseline}" if baseline else "")
        out = self.work / name
        cfg = ClassifierConfig(arch=arch, epochs=self.preset.psi_epochs, baseline=baseline,
                               key=BASELINE_KEYS.get(baseline, 0), transform=transform)
        cmd = (f"ppflower train-classifier --model {arch} --epochs {cfg.epochs}"
               + (f" --limit-train {self.preset.limit_train}" if self.preset.limit_train else "")
               + (f" --limit-eval {self.preset.limit_eval}" if self.preset.limit_eval else "")
               + (f" --baseline {baseline} --key {cfg.key}" if baseline else "")
               + (f" --transform {transform}" if transform else "") + f" --out {out}")
        self.stage(name, out / "metrics.json",
                   lambda: train_classifier(self.splits(self.preset.limit_train), out, cfg, self.device, self.log),
                   cmd)
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
            result = subprocess.run(argv)  # every path above is absolute: the caller's directory does not matter
            if result.returncode != 0:
                raise PPFlowerError(f"The Flower simulation for α={alpha:g} failed (exit {result.returncode}).")

        self.stage(f"transform-{arch}-a{alpha:g}", run_dir / "run.json", run,
                   f"flower-simulation --app sims.main --num-supernodes {self.preset.users} --run-config {shlex.quote(rc)}")
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
                   + f" --out {out}")
        return out

    def attack(self, row: str, target) -> Path:
        from pp_flower.attack import AttackConfig, train_attack

        out = self.work / f"attack-{row}"
        cfg = AttackConfig(**self.preset.attack)
        self.stage(f"attack-{row}", out / "attack.json",
                   lambda: train_attack(target, self.splits(self.preset.attack_limit_train), out, cfg, self.device,
                                        name=ROW_NAMES[row], log=self.log),
                   f"ppflower attack ... --epochs {cfg.epochs} --unet-base {cfg.unet_base} "
                   f"--limit-train {self.preset.attack_limit_train} --out {out}")
        return out

    # --- the whole thing ---------------------------------------------------------------------------------
    def run(self) -> dict:
        from pp_flower.attack import network_target
        from pp_flower.baselines import BASELINES
        from pp_flower.checkpoints import load_transform_net

        p = self.preset
        started = time.time()
        columns: dict[str, dict[str, dict]] = {}
        transforms: dict[str, Path] = {}
        for arch in p.archs:
            col = columns.setdefault(arch, {})
            psi = self.classifier(arch)
            col["plain"] = {"accuracy": _json(psi / "metrics.json")["test-accuracy"]}
            for alpha in p.alphas:
                run_dir = self.transform(arch, alpha, psi)
                user = _json(run_dir / "user-0" / "metrics.json")
                col[_row_key(alpha)] = {"accuracy": user["test-accuracy"],
                                        "accuracy-per-user": [
                                            _json(d / "metrics.json")["test-accuracy"]
                                            for d in sorted(run_dir.glob("user-*"))]}
                if arch == p.archs[0]:
                    transforms[_row_key(alpha)] = run_dir / "user-0" / "best.pt"
            for baseline in p.baselines:
                generator = ""
                if baseline == "gan":
                    generator = str(self.gan() / "transform.pt")
                    transforms.setdefault("gan", Path(generator))
                psi_b = self.classifier(arch, baseline, generator)
                col[baseline] = {"accuracy": _json(psi_b / "metrics.json")["test-accuracy"],
                                 "key": BASELINE_KEYS.get(baseline, GAN_TARGET_KEY if baseline == "gan" else None)}

        attacks = {}
        for row, path in transforms.items():
            attacks[row] = self.attack(row, network_target(load_transform_net(path)[0], self.device))
        for baseline in p.baselines:
            if baseline in BASELINES:
                attacks[baseline] = self.attack(baseline, BASELINES[baseline](BASELINE_KEYS[baseline]))
        return self.report(columns, attacks, transforms, time.time() - started)

    # --- report ------------------------------------------------------------------------------------------
    def report(self, columns: dict, attacks: dict[str, Path], transforms: dict[str, Path], wall: float) -> dict:
        from pp_flower.report import save_psnr_boxplot

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
            table.append(entry)

        self.copy_stage_outputs(columns, attacks)
        total_wall = sum(s["wall-seconds"] for s in self.stages.values())
        meta = {"preset": asdict(p), "command": " ".join(["ppflower", "reproduce", "--preset", p.name]),
                "commit": _git_commit(), "machine": _machine(), "device": self.device,
                "wall-seconds-all-stages": round(total_wall, 1), "wall-seconds-this-invocation": round(wall, 1),
                "stages": self.stages, "data": portable(str(self.data_dir or "torchvision CIFAR-10"))}
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
        self.figures(transforms, attacks)
        return {"meta": meta, "rows": table}

    def copy_stage_outputs(self, columns: dict, attacks: dict[str, Path]) -> None:
        """The small per-stage JSON files next to the table, so every cell can be traced to its source."""
        def copy(src: Path, dest: Path) -> None:  # with this machine's paths made relative to the repo
            dest.write_text(portable(src.read_text()))

        for d in sorted(self.work.glob("psi-*")) + sorted(self.work.glob("gan")):
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


def _json(path: Path) -> dict:
    if not path.exists():
        raise PPFlowerError(f"{path} is missing; rerun `ppflower reproduce` to finish that stage.")
    return json.loads(path.read_text())


def _fmt(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _markdown(table: list[dict], p: Preset, meta: dict) -> str:
    lines = [f"# Table I — preset `{p.name}`", "",
             "Test accuracy of ψ on each kind of image (%), measured by this product on the same data, beside the "
             "paper's Table I; protected-image PSNR and the ITN-Attack's estimate PSNR (medians over the test "
             "images, dB; lower = better protection).", "",
             "## Deviations from the paper", "", *(f"- {d}" for d in p.deviations), "",
             "## Table", ""]
    head = ["Method"]
    for arch in p.archs:
        name = {"resnet20": "ResNet-20", "vgg16": "VGG16-BN"}[arch]
        head += [f"{name} measured", f"{name} paper"]
    head += ["protected PSNR", "ITN-Attack PSNR", "ITN-Attack SSIM"]
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
                  _fmt(e["itn-ssim"]["median"], 3) if "itn-ssim" in e else "—"]
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
              device: str = "cpu", log=print, **overrides) -> dict:
    if preset not in PRESETS:
        raise PPFlowerError(f"Unknown preset '{preset}' (known: {', '.join(PRESETS)}).")
    p = replace(PRESETS[preset], **overrides)
    if vgg_weights:
        os.environ["PPFLOWER_VGG_WEIGHTS"] = str(vgg_weights)
    repro = Reproduction(p, out or Path("results") / preset, workdir or Path("runs") / f"reproduce-{preset}",
                         data_dir, vgg_weights, device, log)
    return repro.run()
