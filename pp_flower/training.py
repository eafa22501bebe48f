"""One resumable training loop for everything pp-flower trains in one process: ψ, the ITN attacker, the GAN.

h_θ is not trained here: its step is split between user and provider (pp_flower.user, strategies.provider)
and its in-process twin is pp_flower.reference. Everything else shares this loop, which owns what must be
the same everywhere: derived seeds, the optimizer and schedule, the resume point, best-by-validation
selection and the per-epoch history. A caller brings only what differs: the modules, the loss of one
batch and the validation measure.

Every batch is a pure function of (seed, epoch, step), so a run killed anywhere and rerun with the same
command continues exactly where it stopped and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pp_flower.checkpoints import load_resume_point, save_atomic
from pp_flower.errors import PPFlowerError
from pp_flower.losses import lr_at, one_cycle_lr
from pp_flower.progress import track
from pp_flower.seeds import generator
from pp_flower.transform import steps_per_epoch


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, purpose: str = "order") -> list[torch.Tensor]:
    """The sample indices of each step of ``epoch``: a fresh permutation per epoch, the last batch possibly short
    but never a single image (dropped, as in pp_flower.transform.steps_per_epoch: BatchNorm cannot train on it)."""
    batches = list(torch.split(torch.randperm(n, generator=generator(seed, purpose, epoch)), batch_size))
    return batches[:steps_per_epoch(n, batch_size)]


def data_key(splits, parts: tuple[str, ...] = ("train", "val", "test")) -> dict[str, Any]:
    """The part of a resume or cache key that says which images a run used: a fingerprint of their pixels
    (pp_flower.data.dataset_fingerprint; covers the data set, the limits and the split) and their counts."""
    from pp_flower.data import dataset_fingerprint

    sets = [getattr(splits, part) for part in parts]
    return {"data": dataset_fingerprint(*(s.images for s in sets)),
            **{f"n-{part}": len(s) for part, s in zip(parts, sets)}}


@dataclass
class SGDRecipe:
    """The paper's optimiser for ψ and the attacker: SGD with momentum, lr × 0.2 at 30/60/80 % of the epochs."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    schedule: str = "step"      # step: the paper's ×0.2 at 30/60/80 %; onecycle: warm-up then linear decay

    def __post_init__(self) -> None:
        finite = math.isfinite
        for name, ok, allowed in (("epochs", self.epochs >= 1, "≥ 1"), ("batch_size", self.batch_size >= 1, "≥ 1"),
                                  ("lr", finite(self.lr) and self.lr > 0, "> 0 (and finite)"),
                                  ("momentum", finite(self.momentum) and 0 <= self.momentum < 1, "in [0, 1)"),
                                  ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0,
                                   "≥ 0 (and finite)"),
                                  ("seed", self.seed >= 0, "≥ 0"),
                                  ("schedule", self.schedule in ("step", "onecycle"), "step or onecycle")):
            if not ok:
                raise PPFlowerError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(self, name)!r}.")

    def optimizer(self, module: nn.Module) -> torch.optim.SGD:
        return torch.optim.SGD(module.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def lr_at(self, epoch: float) -> float:
        if self.schedule == "onecycle":
            return one_cycle_lr(epoch, self.epochs, self.lr)
        return lr_at(int(epoch), self.epochs, self.lr)


@dataclass
class Job:
    """What one training run is made of; :func:`fit` does the rest.

    ``step(ids, g)`` runs one optimisation step on the training samples ``ids`` (``g`` seeds its random
    augmentation) and returns its losses as floats; ``validate()`` returns metrics with ``val_loss`` (lower is
    better); ``save_best(epoch, val)`` writes the selected model.
    """

    kind: str                                 # checkpoint kind of the resume point ``last.pt``
    config: dict[str, Any]                    # a resume point written with another config is refused
    modules: dict[str, nn.Module]             # saved under these keys of ``last.pt``
    optimizers: dict[str, torch.optim.Optimizer]
    step: Callable[[torch.Tensor, torch.Generator], dict[str, float]]
    validate: Callable[[], dict[str, float]] | None
    save_best: Callable[[int, dict[str, float]], None] | None
    n_train: int
    epochs: int
    batch_size: int
    seed: int
    lr: Callable[[float], float] | None = None  # learning rate at a fractional epoch (None: the optimizer's own)
    checkpoint_every: int = 10                  # steps between mid-epoch resume points (0: epoch ends only)
    header: dict[str, Any] = field(default_factory=dict)  # extra fields of ``last.pt`` (e.g. ψ's arch)
    desc: str = "training"


def fit(job: Job, out_dir: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``job`` to ``job.epochs``, resuming from ``out_dir/last.pt``; returns the run's progress record.

    The record holds ``history`` (one entry per epoch: lr, mean train losses, validation metrics),
    ``best-val-loss``, ``best-epoch`` and ``wall-seconds-this-session`` (metric keys use hyphens, as Flower's do).
    """
    last = Path(out_dir) / "last.pt"
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "best-val-loss": float("inf"),
                                "best-epoch": 0, "sums": {}, "seen": 0}
    if job.n_train < 2 or not steps_per_epoch(job.n_train, job.batch_size):
        raise PPFlowerError(f"{job.desc}: {job.n_train} training image(s) make no batch BatchNorm can train on; use "
                            "at least 2 (--limit-train ≥ 2, or 0 for all).")
    if (blob := load_resume_point(last, job.kind, job.config, job.desc, log)) is not None:
        for name, module in job.modules.items():
            module.load_state_dict(blob[name])
        for name, opt in job.optimizers.items():
            opt.load_state_dict(blob[name])
        progress = blob["progress"]
        log(f"Resuming from {last}: epoch {progress['epoch'] + 1}, step {progress['step']}")

    def checkpoint() -> None:
        save_atomic({**job.header, "kind": job.kind, "config": job.config, "progress": progress,
                     **{k: m.state_dict() for k, m in job.modules.items()},
                     **{k: o.state_dict() for k, o in job.optimizers.items()}}, last)

    started = time.time()
    while progress["epoch"] < job.epochs:
        epoch = progress["epoch"]
        batches = epoch_batches(job.n_train, job.batch_size, job.seed, epoch)
        for module in job.modules.values():
            module.train()
        steps = range(progress["step"], len(batches))
        for step in track(steps, f"{job.desc} epoch {epoch + 1}/{job.epochs}", total=len(steps)):
            if job.lr is not None:
                for opt in job.optimizers.values():
                    for group in opt.param_groups:
                        group["lr"] = job.lr(epoch + step / len(batches))
            losses = job.step(batches[step], generator(job.seed, "augment", epoch, step))
            if not all(math.isfinite(v) for v in losses.values()):  # a diverged run must not report numbers
                raise PPFlowerError(f"{job.desc}: the loss became {losses} at epoch {epoch + 1}, step {step + 1}; "
                                    f"lower the learning rate (--lr). The last resume point is kept.")
            n = len(batches[step])
            for k, v in losses.items():
                progress["sums"][k] = progress["sums"].get(k, 0.0) + v * n
            progress["seen"] += n
            progress["step"] = step + 1
            at_checkpoint = job.checkpoint_every and progress["step"] % job.checkpoint_every == 0
            if at_checkpoint and progress["step"] < len(batches):
                checkpoint()
        record = {"epoch": epoch + 1, "lr": next(iter(job.optimizers.values())).param_groups[0]["lr"],
                  **{k: v / max(progress["seen"], 1) for k, v in progress["sums"].items()}}
        if job.validate is not None:
            for module in job.modules.values():
                module.eval()
            val = job.validate()
            record.update(val)
            if val["val-loss"] < progress["best-val-loss"]:
                progress.update({"best-val-loss": val["val-loss"], "best-epoch": epoch + 1})
                if job.save_best is not None:
                    job.save_best(epoch + 1, val)
        progress["history"].append(record)
        log(f"{job.desc} epoch {epoch + 1}: " + "  ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch",)))
        progress.update(epoch=epoch + 1, step=0, sums={}, seen=0)
        checkpoint()
    return {**progress, "wall-seconds-this-session": time.time() - started}
