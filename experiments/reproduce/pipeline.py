"""``ppflower reproduce --preset cpu|paper``: the paper's Table I and Figs. 5–7, measured by the product itself.

Stages, each resumable (a finished stage is skipped; an interrupted one continues from its last checkpoint,
except a Flower simulation, which restarts):

1. ``psi-<arch>``            the provider trains ψ on plain images;
2. ``transform-<arch>-a<α>`` h_θ for every α through the Flower app (``flower-simulation --app sims.main``);
3. ``gan``                   the GAN-based transformation's generator;
4. ``psi-<arch>-<baseline>`` ψ trained on Tanaka-, pixel- (single key, per-image keys) and GAN-protected images;
5. ``attack-<row>``          the ITN-Attack on every protected row (ResNet-20 column's transforms);
6. report                    ``table1.md`` / ``table1.json`` with the paper's numbers beside the measured ones,
                             ``fig5_alpha.png``, ``fig6_attack.png``, ``fig7_psnr_boxplot.png``
                             (:mod:`experiments.reproduce.report`).

Checkpoints go to ``--workdir`` (default ``runs/reproduce-<preset>``); the small results (tables, figures,
per-stage JSON, wall times) to ``--out`` (default ``results/<preset>``). :class:`StageRunner` is the resumable
stage bookkeeping; ``ppflower demo`` (:mod:`experiments.demo`) runs its stages with it too.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from experiments.reproduce.presets import BASELINE_KEYS, GAN_TARGET_KEY, PRESETS, ROW_NAMES, Preset, row_key
from experiments.reproduce.report import (build_table, copy_stage_outputs, git_commit, machine, markdown, portable,
                                          read_json, save_figures, save_psnr_boxes, table_rows)
from pp_flower.config import format_run_config
from pp_flower.errors import PPFlowerError


def run_child(argv: list[str]) -> int:
    """Run a child command (a stage's flower-simulation) to its end; its exit code.

    An interrupt of this process (Ctrl-C, SIGTERM, SIGHUP: runtime.signals) is passed on to the child as Ctrl-C and
    waited for, so no simulation outlives ``reproduce`` (and the child gets SIGTERM should this process be killed
    outright). A child that was itself interrupted (exit 130 or a signal) interrupts this run too: it is reported
    as interrupted, not as failed."""
    import signal

    from runtime import signals

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


class StageRunner:
    """Named stages, each run once and resumable: a stage whose ``done`` file exists is skipped.

    Wall times (summed over resumed attempts), attempt counts and each stage's command are kept in
    ``OUT/stages.json``. ``fingerprint()`` names the data every stage draws from (asked once); it joins every
    stage's key. ``until`` names a stage after which the run stops (:class:`StopAfter`). ``elsewhere`` is the
    refusal's hint where a changed run should go instead."""

    def __init__(self, out: Path, fingerprint, log=print, until: str = "",
                 elsewhere: str = "use another --workdir and --out for this run"):
        self.out, self.fingerprint, self.log, self.until, self.elsewhere = Path(out), fingerprint, log, until, elsewhere
        self.file = self.out / "stages.json"
        self._data: str | None = None
        self.stages = json.loads(self.file.read_text()) if self.file.exists() else {}
        for name, entry in self.stages.items():  # stages.json of 0.1 spelt its keys with underscores
            self.stages[name] = {k.replace("_", "-"): v for k, v in entry.items()}

    def stage(self, name: str, done: Path, run, command: str = "", key: dict | None = None) -> None:
        """Run ``run()`` unless ``done`` exists; record its wall time (summed over resumed attempts).

        ``key`` is what defines the stage's result (its settings and the data's fingerprint), kept beside ``done``
        as ``stage-key.json``: a done stage is reused only for the same key, else refused naming what changed.
        A stage done before keys were kept (no stage-key.json) is reused as it is."""
        from pp_flower.checkpoints import describe_changes, key_changes

        if self._data is None:
            self._data = self.fingerprint()
        key = {**(key or {}), "data": self._data}
        key_file = done.parent / "stage-key.json"
        # done: its output exists and it finished (a key is written only then); an output left by a failed attempt
        # (a Flower run writes run.json even when its users failed) means: run it again, it resumes
        if done.exists() and (key_file.exists() or self.stages.get(name, {}).get("finished", True)):
            if key_file.exists():
                old = json.loads(key_file.read_text())
                changed, _ = key_changes(old, key)
                if changed:
                    raise PPFlowerError(f"Stage {name} in {done.parent} was computed with other settings or data "
                                        f"({describe_changes(old, key, changed)}); {self.elsewhere}, or delete "
                                        f"{done.parent} to recompute the stage.")
            self.log(f"[dim]✓ {name}: done ({done})[/]")
            self._maybe_stop(name)
            return
        self.log(f"[bold]▶ {name}[/]")
        if command and self.stages.get(name, {}).get("command") not in (None, portable(command)):
            del self.stages[name]  # another recipe's wall time (an older preset) is not this stage's
        started, succeeded = time.time(), False
        try:
            run()
            succeeded = True
        finally:
            entry = self.stages.setdefault(name, {"wall-seconds": 0.0, "attempts": 0})
            entry["wall-seconds"] += time.time() - started
            entry["attempts"] += 1
            entry["finished"] = succeeded and done.exists()
            if command:
                entry["command"] = portable(command)
            self.file.write_text(json.dumps(self.stages, indent=2))
        if not done.exists():
            raise PPFlowerError(f"Stage {name} ended without writing {done}.")
        key_file.write_text(json.dumps(key, indent=2))
        self._maybe_stop(name)

    def _maybe_stop(self, name: str) -> None:
        if self.until == name:
            raise StopAfter(name)


class Reproduction:
    """Every stage of one preset, in order (:meth:`run`), then the report."""

    def __init__(self, preset: Preset, out: Path, workdir: Path, data_dir=None, vgg_weights=None,
                 device: str = "cpu", log=print, until: str = ""):
        self.preset, self.out, self.work, self.until = preset, Path(out), Path(workdir), until
        self.data_dir, self.vgg_weights, self.device, self.log = data_dir, vgg_weights, device, log
        from pp_flower.checkpoints import ensure_writable_dir

        ensure_writable_dir(self.out, "--out")
        ensure_writable_dir(self.work, "--workdir")
        self.runner = StageRunner(self.out, self.data_fingerprint, log, until)
        self.stages = self.runner.stages
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
        """One stage through the run's :class:`StageRunner` (skipped when done, refused when its key changed)."""
        self.runner.stage(name, done, run, command, key)

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

    def transform(self, arch: str, alpha: float, classifier: Path, grad_noise: float = 0.0) -> Path:
        """h_θ at ``alpha`` through the Flower app (``grad_noise`` > 0: with the provider's gradient-noise defence)."""
        name = f"transform-{arch}-a{alpha:g}" + (f"-noise{grad_noise:g}" if grad_noise else "")
        run_dir = self.work / name
        run_config = {**self.preset.transform, "alpha": alpha, "classifier": str((classifier / "best.pt").resolve()),
                      "run-dir": str(run_dir.resolve()), "limit-eval": self.preset.limit_eval,
                      "num-threads": max(1, (os.cpu_count() or 2) // max(1, self.preset.users)),
                      "provider-device": self.device, "user-device": self.device}
        if grad_noise:
            run_config["grad-noise"] = grad_noise
        if self.data_dir:
            run_config["data-dir"] = str(Path(self.data_dir).resolve())
        if self.vgg_weights:
            run_config["vgg-weights"] = str(Path(self.vgg_weights).resolve())
        rc = format_run_config(run_config)
        gpus = 1.0 / self.preset.users if self.device.startswith("cuda") else 0.0
        argv = [sys.executable, "-m", "runtime.flower_simulation", "--app", "sims.main", "--num-supernodes",
                str(self.preset.users), "--num-gpus", str(gpus), "--run-config", rc]

        def run() -> None:
            returncode = run_child(argv)  # every path above is absolute: the caller's directory does not matter
            if returncode != 0:
                raise PPFlowerError(f"The Flower simulation for α={alpha:g} failed (exit {returncode}).")

        from pp_flower.user import LiveUser

        ignore = {*LiveUser.MECHANICS, "classifier", "data-dir", "vgg-weights"}  # ψ's and the data's keys cover them
        key = {"users": self.preset.users, **{k: v for k, v in run_config.items() if k not in ignore}}
        command = (f"flower-simulation --app sims.main --num-supernodes {self.preset.users} "
                   f"--run-config {shlex.quote(rc)}")
        self.stage(name, run_dir / "run.json", run, command, key)
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

    def attack(self, row: str, target, target_id: str, perceptual: float = 0.0, stage: str = "",
               restorer: bool = False) -> Path:
        """An attacker on one row's provider-held tensor (``target``: a ProviderTarget), with recognisability:
        the paper's ITN-Attack, ``perceptual`` > 0 the ITN with a VGG feature loss, ``restorer`` the paired
        restorer (Adam, L1 + VGG perceptual)."""
        from pp_flower.attack import AttackConfig, attack_key, restorer_config, target_fingerprint, train_attack

        suffix = "-restorer" if restorer else (f"-strong-w{perceptual:g}" if perceptual else "")
        stage = stage or f"attack-{row}{suffix}"
        out = self.work / stage
        cfg = AttackConfig(**{**self.preset.attack, "perceptual": perceptual})
        if restorer:
            cfg = restorer_config(cfg)
        attacker = "restorer" if restorer else ("ITN+feat" if perceptual else "ITN")
        observer_path = self.work / f"observer-{self.preset.archs[0]}" / "best.pt"
        observer = self._observer(observer_path)
        self.stage(stage, out / "attack.json",
                   lambda: train_attack(target, self.splits(self.preset.attack_limit_train), out, cfg, self.device,
                                        name=ROW_NAMES.get(row, row), log=self.log, target_id=target_id,
                                        observer=(observer, target_fingerprint(observer_path)), attacker=attacker,
                                        target_name=row, vgg_weights=self.vgg_weights),
                   f"ppflower attack ... --epochs {cfg.epochs} --unet-base {cfg.unet_base} "
                   + ("--restorer " if restorer else f"--strong {perceptual:g} " if perceptual else "")
                   + f"--wire {target.wire} --limit-train {self.preset.attack_limit_train} --out {out}",
                   {"target": target_id, **{k: v for k, v in attack_key(cfg).items() if k != "checkpoint_every"},
                    **target.cache_fields(), "limit-train": self.preset.attack_limit_train,
                    "limit-eval": self.preset.limit_eval, "observer": target_fingerprint(observer_path)})
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
        from pp_flower.attack import provider_target, target_fingerprint
        from pp_flower.baselines import BASELINES
        from pp_flower.checkpoints import load_transform_net
        from pp_flower.evaluation import wire_of_run

        p = self.preset
        started = time.time()
        columns: dict[str, dict[str, dict]] = {}
        transforms: dict[str, Path] = {}
        first = p.archs[0]

        def h_target(path: Path):  # h_θ as the provider held its outputs: on its run's wire
            wire = wire_of_run(path.parent.parent) or p.transform.get("wire", "uint8")
            return provider_target(load_transform_net(path)[0], wire, "image", self.device), target_fingerprint(path)

        # the science first: ψ, the observer, h_θ per α and its attacks; the baselines after
        psis = {arch: self.classifier(arch) for arch in p.archs}
        self.classifier(first, role="observer")
        for arch in p.archs:
            col = columns.setdefault(arch, {})
            col["plain"] = {"accuracy": read_json(psis[arch] / "metrics.json")["test-accuracy"]}
            for alpha in p.alphas:
                run_dir = self.transform(arch, alpha, psis[arch])
                user = read_json(run_dir / "user-0" / "metrics.json")
                col[row_key(alpha)] = {"accuracy": user["test-accuracy"],
                                        "accuracy-per-user": [
                                            read_json(d / "metrics.json")["test-accuracy"]
                                            for d in sorted(run_dir.glob("user-*"))],
                                        "wire": read_json(run_dir / "run.json")["config"].get("wire", "float32"),
                                        "label-leakage": user.get("label-leakage")}
                if arch == first:
                    transforms[row_key(alpha)] = run_dir / "user-0" / "best.pt"
        attacks = {row: self.attack(row, *h_target(path)) for row, path in transforms.items()}
        strong = self.strong_attacks(transforms, h_target)
        restorers = {row: self.attack(row, *h_target(path), restorer=True) for row, path in transforms.items()}
        budget = self.budget_curve(psis[first], h_target)
        defence = self.defence(psis[first], columns[first])

        for arch in p.archs:
            col = columns[arch]
            for baseline in p.baselines:
                generator = ""
                if baseline == "gan":
                    generator = str(self.gan() / "transform.pt")
                    transforms.setdefault("gan", Path(generator))
                psi_b = self.classifier(arch, baseline, generator)
                col[baseline] = {"accuracy": read_json(psi_b / "metrics.json")["test-accuracy"],
                                 "key": BASELINE_KEYS.get(baseline, GAN_TARGET_KEY if baseline == "gan" else None)}
        if "gan" in transforms:
            attacks["gan"] = self.attack("gan", *h_target(transforms["gan"]))
            restorers["gan"] = self.attack("gan", *h_target(transforms["gan"]), restorer=True)
        for baseline in p.baselines:
            if baseline in BASELINES:  # encrypted images travel as 8-bit images
                target = provider_target(BASELINES[baseline](BASELINE_KEYS[baseline]), "uint8")
                tid = f"{baseline}:key{BASELINE_KEYS[baseline]}"
                attacks[baseline] = self.attack(baseline, target, tid)
                restorers[baseline] = self.attack(baseline, target, tid, restorer=True)
        return self.report(columns, attacks, strong, budget, transforms, time.time() - started, defence, restorers)

    def strong_attacks(self, transforms: dict[str, Path], h_target) -> dict[str, Path]:
        """The stronger attacker on every α row, its feature-loss weight chosen on one row's validation MSE."""
        p = self.preset
        alpha_rows = [r for r in transforms if r.startswith("alpha")]
        if not p.strong_weights or p.strong_row not in transforms:
            return {}
        sweep = {w: self.attack(p.strong_row, *h_target(transforms[p.strong_row]), perceptual=w)
                 for w in p.strong_weights}
        val = {w: min(h["val-loss"] for h in read_json(path / "attack.json")["history"]) for w, path in sweep.items()}
        best = min(val, key=val.get)
        (self.out / "strong_sweep.json").write_text(json.dumps(
            {"row": p.strong_row, "val-mse": {f"{w:g}": v for w, v in val.items()}, "chosen": best}, indent=2))
        self.log(f"Stronger attacker: feature-loss weight {best:g} (validation MSE {val[best]:.5f} on {p.strong_row})")
        return {row: sweep[best] if row == p.strong_row else
                self.attack(row, *h_target(transforms[row]), perceptual=best) for row in alpha_rows}

    def defence(self, psi: Path, column: dict) -> list[dict]:
        """The grad-noise defence and its price (``defence.json``, ``fig_defence.png``): ψ's accuracy on x̂ and the
        users' label inference for h_θ trained at ``defence_alpha`` with each noise level (0: the Table I row)."""
        p, arch = self.preset, self.preset.archs[0]
        if not p.grad_noises or row_key(p.defence_alpha) not in column:
            return []
        base = column[row_key(p.defence_alpha)]
        points = [{"grad-noise": 0.0, "test-accuracy": base["accuracy"], "label-leakage": base["label-leakage"]}]
        for noise in p.grad_noises:
            user = read_json(self.transform(arch, p.defence_alpha, psi, grad_noise=noise) / "user-0" / "metrics.json")
            points.append({"grad-noise": noise, "test-accuracy": user["test-accuracy"],
                           "label-leakage": user.get("label-leakage")})
        plain = read_json(psi / "metrics.json")["test-accuracy"]
        (self.out / "defence.json").write_text(json.dumps(
            {"alpha": p.defence_alpha, "plain-accuracy": plain, "points": points}, indent=2))
        from pp_flower.report import save_defence

        save_defence(points, plain, self.out / "fig_defence.png")
        return points

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
                    out = self.attack(row_key(alpha), *h_target(best))
                else:
                    out = self.attack(f"budget-a{alpha:g}-e{epoch}", target, target_id,
                                      stage=f"attack-budget-a{alpha:g}-e{epoch}")
                result = read_json(out / "attack.json")
                points.append({"epoch": epoch,
                               "test-accuracy": self.protected_accuracy(psi, load_transform_net(path)[0]),
                               **{k: result[k] for k in ("psnr-protected", "ssim-protected", "psnr-estimated",
                                                         "ssim-estimated", "recognisability-protected",
                                                         "recognisability-estimated") if k in result}})
            curve[f"{alpha:g}"] = points
        if curve:
            plain = read_json(psi / "metrics.json")["test-accuracy"]
            (self.out / "budget_curve.json").write_text(json.dumps({"plain-accuracy": plain, "alphas": curve},
                                                                   indent=2))
            from pp_flower.report import save_budget_curve

            save_budget_curve(curve, plain, self.out / "fig_budget_curve.png")
        return curve

    # --- report ------------------------------------------------------------------------------------------
    # --- report ------------------------------------------------------------------------------------------
    def report(self, columns: dict, attacks: dict[str, Path], strong: dict[str, Path], budget: dict,
               transforms: dict[str, Path], wall: float, defence: list[dict] | None = None,
               restorers: dict[str, Path] | None = None) -> dict:
        """Table I (``table1.json``, ``table1.md``) and the figures, from the stages' outputs."""
        from pp_flower.data import to_float
        from pp_flower.report import save_frontier

        p = self.preset
        from pp_flower.attack import summarise_attacks

        restorers = restorers or {}
        attack_results = {row: read_json(path / "attack.json") for row, path in attacks.items()}
        table = build_table(p, columns, attack_results, strong, restorers)
        every = {**attacks, **{f"{row}-strong": path for row, path in strong.items()},
                 **{f"{row}-restorer": path for row, path in restorers.items()}}
        copy_stage_outputs(self.work, self.out, every)
        (self.out / "attack" / "summary.json").write_text(json.dumps(
            summarise_attacks({tag: read_json(path / "attack.json") for tag, path in every.items()}), indent=2))
        total_wall = sum(s["wall-seconds"] for s in self.stages.values())
        meta = {"preset": asdict(p), "command": " ".join(["ppflower", "reproduce", "--preset", p.name]),
                "commit": git_commit(), "machine": machine(), "device": self.device,
                "wall-seconds-all-stages": round(total_wall, 1), "wall-seconds-this-invocation": round(wall, 1),
                "stages": self.stages, "data": portable(str(self.data_dir or "torchvision CIFAR-10")),
                "observer-accuracy": read_json(self.work / f"observer-{p.archs[0]}" / "metrics.json")["test-accuracy"]}
        (self.out / "table1.json").write_text(json.dumps({"meta": meta, "rows": table}, indent=2))
        (self.out / "table1.md").write_text(markdown(table, p, meta, defence or []))
        self.log(f"Table I → {self.out / 'table1.md'}")
        save_psnr_boxes(table_rows(p), attack_results, self.out / "fig7_psnr_boxplot.png")
        save_frontier(table, p.archs[0], meta["observer-accuracy"], self.out / "fig_frontier.png")
        x = to_float(self.splits(p.attack_limit_train).test.images[:8])
        save_figures(self.out, x, p, transforms, attacks)
        return {"meta": meta, "rows": table, "budget": budget}


def _same_weights(a: Path, b: Path) -> bool:
    from pp_flower.checkpoints import load_checkpoint

    sa, sb = load_checkpoint(a, "transform_net")["state_dict"], load_checkpoint(b, "transform_net")["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)




def reproduce(preset: str, out: Path | None = None, workdir: Path | None = None, data_dir=None, vgg_weights=None,
              device: str = "cpu", log=print, until: str = "", **overrides) -> dict | None:
    """Run (or resume) every stage of ``preset`` and write its table and figures; ``until`` stops after that
    stage (returns None)."""
    if preset not in PRESETS:
        raise PPFlowerError(f"Unknown preset '{preset}' (known: {', '.join(PRESETS)}).")
    p = replace(PRESETS[preset], **overrides)
    repro = Reproduction(p, out or Path("results") / preset, workdir or Path("runs") / f"reproduce-{preset}",
                         data_dir, vgg_weights, device, log, until)
    try:
        return repro.run()
    except StopAfter as stop:
        log(f"Stopped after stage {stop} (--until); rerun without --until to go on.")
        return None
