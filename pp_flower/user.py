"""The user's live side: h_θ, its optimizer, φ and the images stay in memory between messages.

A ``UserTrainer`` hosts any number of users (one process per GPU or per group of cores, not one per user:
a process that imports torch costs ~300 MB). The per-message ClientApp (``sims.main``) only relays each
message to its user's trainer — a Ray actor in simulation, a process beside the SuperNode in deployment
(``runtime.supernode``), or this very process — so a step costs the step's compute plus two small messages,
whatever h_θ's size (BENCHMARKS.md). Inputs and outputs are plain dicts of numpy arrays: they cross a Ray
call or an authenticated Unix socket (``pp_flower.channel``) without Flower's records.

Durability without per-step copies: a user writes a resume point every ``checkpoint-every`` steps and at each
validation. When its trainer dies the user is unknown to the restarted one, answers ``NOT_SET_UP``, and the
provider sends a resume setup: the user reloads its resume point and the provider replays the steps after it.
ψ is frozen and batch t is a pure function of (seed, user, t), so the replay gives exactly the same θ.
"""

from __future__ import annotations

import json
import logging
import time
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pp_flower import protocol
from pp_flower.checkpoints import key_changes, load_checkpoint, save_atomic, transform_blob
from pp_flower.config import AppConfig
from pp_flower.data import load_datasets, to_float
from pp_flower.errors import PPFlowerError
from pp_flower.features import load_feature_net
from pp_flower.models import UNet, unet_from_state_dict
from pp_flower.transform import (feature_gradient, frozen_batchnorm_statistics, init_transform_net, make_optimizer,
                                 set_lr, train_batch, user_backward_kept, user_backward_recomputed, user_forward,
                                 user_forward_with_graph, user_seed)
from pp_flower.wire import encode, provider_view

log = logging.getLogger("pp_flower.user")

# one background thread per trainer: a kept batch's feature-loss gradient is computed while the provider runs ψ
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pp-feature")
# "auto": overlap only on a GPU. On CPU the thread's convolutions take the cores ψ is running on: measured on 2
# cores at width 16, batch 128 (issue #24), ψ's step went from 0.27 to 0.44 s and the round got slower, not faster.
OVERLAP = os.environ.get("PPFLOWER_FEATURE_OVERLAP", "auto")


def overlap_feature_gradient(device: torch.device) -> bool:
    """Whether a kept batch's feature gradient runs in the background while ψ runs (``PPFLOWER_FEATURE_OVERLAP``:
    ``1`` always, ``0`` never, ``auto`` (default) on CUDA only)."""
    return OVERLAP == "1" or (OVERLAP == "auto" and torch.device(device).type == "cuda")



@dataclass
class Progress:
    """A user's counters and curves: what a resume point keeps besides θ and momentum (hyphenated keys on disk)."""

    step: int = 0                     # SGD steps applied
    pending: bool = False             # batch ``step`` was sent and its gradient has not been applied yet
    best_val: float = float("inf")    # lowest validation L_trans so far
    best_epoch: int = -1
    val_curve: list[float] = field(default_factory=list)
    feature_losses: list[float] = field(default_factory=list)
    steps_kept: int = 0               # steps whose backward used the kept graph (keep-graph), over every resume
    steps_recomputed: int = 0         # steps that recomputed h_θ's forward pass instead

    def to_dict(self) -> dict:
        return {k.replace("_", "-"): (list(v) if isinstance(v, list) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Progress":
        return cls(step=int(d["step"]), pending=bool(d.get("pending", False)), best_val=float(d["best-val"]),
                   best_epoch=int(d["best-epoch"]), val_curve=[float(v) for v in d.get("val-curve", [])],
                   feature_losses=[float(v) for v in d.get("feature-losses", [])],
                   steps_kept=int(d.get("steps-kept", 0)), steps_recomputed=int(d.get("steps-recomputed", 0)))


@dataclass
class KeptBatch:
    """The batch a live user sent and awaits the gradient of: x̂ with its autograd graph, and the feature term."""

    step: int
    ids: torch.Tensor                 # int64 (n,): its sample ids
    xhat: torch.Tensor                # (n, C, H, W) = h_θ(x), graph attached
    feature: Future                   # of (∂(−α·L_feat)/∂x̂, L_feat), computed while the provider runs ψ


class NotSetUp(PPFlowerError):
    """The trainer holds no live state for this user (new trainer, or it restarted): a resume setup is due."""

    def __init__(self, what: str):
        super().__init__(f"{protocol.NOT_SET_UP} ({what})")


def _tensor(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def graph_budget(device: str) -> int:
    """Bytes a trainer may spend on kept autograd graphs: a quarter of the free memory of the user's device."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] // 4
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"] // 4
    except (OSError, KeyError, ValueError):
        return 2**30


def resolve_device(name: str, index: int) -> str:
    """The user's torch device (pp_flower.config.resolve_device, the project's one rule); a device its trainer
    does not see is one clear error naming the fix."""
    from pp_flower.config import resolve_device as resolve

    try:
        return resolve(name, f"user {index}: user-device")
    except PPFlowerError as exc:
        raise PPFlowerError(f"{exc} Give users GPU shares (flower-simulation --num-gpus 0.25) or set "
                            "user-device=\"cpu\".") from None


class LiveUser:
    """One user's state, in memory for the whole run (the paper's h_θ training, Sec. III-C, from the user's side)."""

    def __init__(self, meta: dict, ids: dict[str, torch.Tensor]):
        meta = dict(meta)
        self.index = int(meta.pop("user-index"))
        self.steps_per_epoch = int(meta.pop("steps-per-epoch"))
        self.out_dir = Path(str(meta.pop("out-dir")))
        self.data_fingerprint = str(meta.pop("data-fingerprint", ""))  # what the provider's ids index
        self.cfg = AppConfig.from_run_config(meta)
        self.device = resolve_device(self.cfg.user_device, self.index)
        self.ids = ids
        self.net: UNet = init_transform_net(self.cfg.unet_base, self.cfg.unet_depth, self.cfg.seed,
                                            self.index, self.cfg.unet_arch).to(self.device)
        self.opt = make_optimizer(self.net, self.cfg.lr, self.cfg.momentum, self.cfg.weight_decay)
        self.progress = Progress()
        self.best: dict[str, torch.Tensor] | None = None   # h_θ with the lowest validation L_trans (test uses it)
        self.acc: dict[str, torch.Tensor] = {}              # evaluation results gathered chunk by chunk
        self.last_eval: tuple[tuple, dict] | None = None    # the last evaluation request and its reply
        self.kept: KeptBatch | None = None  # the sent batch whose gradient is awaited, its graph kept
        self.keep_graph = {"keep": True, "recompute": False}.get(self.cfg.keep_graph)  # None: decide (auto)
        self._data = self._phi = self._data_key = None
        self.hosted = 1  # users sharing this user's trainer (its memory budget for kept graphs)
        self.probe = None  # the gradients received, kept to measure label leakage (pp_flower.label_leakage)
        if self.cfg.probe_images:
            from pp_flower.label_leakage import LabelProbe

            self.probe = LabelProbe(self.cfg.probe_images)
        self._resume_key = self._make_resume_key()  # fixed for the user's life; snapshots run on hot paths

    @property
    def graph_mode(self) -> str:
        """Which way this user's training steps got their autograd graph, over all its runs (BENCHMARKS.md,
        run.json): ``kept``, ``recomputed``, ``kept N, recomputed M`` or ``no steps``."""
        kept, recomputed = self.progress.steps_kept, self.progress.steps_recomputed
        if kept and recomputed:
            return f"kept {kept}, recomputed {recomputed}"
        return "kept" if kept else "recomputed" if recomputed else "no steps"

    # --- data ------------------------------------------------------------------------------------------
    def images(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) of the full train or test set; ids index into them. Looked up once per user:
        finding a data set in the process cache lists its folder, which costs more than a small step."""
        if self._data is None:
            self._data = load_datasets(self.cfg.data_dir or None)
        ds = self._data[0] if part in ("train", "val") else self._data[1]
        return ds.images, ds.labels

    def check_data(self) -> None:
        """Refuse to index another data set than the provider's: the same ids would name other images (no label
        is compared: file names and counts only)."""
        from pp_flower.data import index_fingerprint, resolve_data_dir

        if not self.data_fingerprint:
            return
        mine = index_fingerprint(self.cfg.data_dir or None)
        if mine != self.data_fingerprint:
            where = resolve_data_dir(self.cfg.data_dir or None) or "torchvision's CIFAR-10"
            raise PPFlowerError(f"user {self.index}: its data set ({where}: {mine}) is not the provider's "
                                f"({self.data_fingerprint}), so the provider's sample ids would index other images; "
                                "point this user's data-dir (node config or PPFLOWER_DATA_DIR) at the provider's "
                                "data set.")

    def feature_net(self):
        if self._phi is None:
            self._phi = load_feature_net(self.cfg.vgg_weights or None, self.cfg.feature_layer, self.device)
        return self._phi

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, _ = self.images("train")
        ids, x = train_batch(images, self.ids["train"], step, self.steps_per_epoch, self.cfg.batch_size,
                             user_seed(self.cfg.seed, self.index), self.cfg.augment)
        return ids, x.to(self.device)

    # --- resume points (the only copies of θ a run makes, every checkpoint-every steps and at validation) ---
    def snapshot(self) -> dict:
        """θ, BatchNorm statistics, momentum and counters: what a resume point (and context mode) keeps."""
        momentum = {name: self.opt.state[p]["momentum_buffer"].cpu() for name, p in self.net.named_parameters()
                    if "momentum_buffer" in self.opt.state.get(p, {})}
        return {"kind": "user_state", "user-index": self.index, "unet-base": self.cfg.unet_base,
                "alpha": self.cfg.alpha, "config": self.resume_key(),
                "state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
                "momentum": momentum, "progress": {**self.progress.to_dict(), "pending": False}}

    # run-config keys that change how a run ends, not what h_θ becomes: a resume point ignores them
    MECHANICS = ("run-dir", "step-timeout", "max-failures", "min-users", "wait-for-users", "num-threads",
                 "user-device", "provider-device", "provider-microbatch", "keep-graph", "eval-chunk",
                 "checkpoint-every", "keep-epochs", "probe-images")

    def resume_key(self) -> dict:
        """What a resume point must match to continue this user: its config, its batches and its images."""
        return self._resume_key

    def _make_resume_key(self) -> dict:
        import hashlib

        ids = hashlib.sha256(self.ids["train"].numpy().tobytes()).hexdigest()[:16]
        return {**{k: v for k, v in self.cfg.to_run_config().items() if k not in self.MECHANICS},
                "user-index": self.index, "steps-per-epoch": self.steps_per_epoch, "train-ids": ids}

    def data_key(self) -> str:
        """A fingerprint of this user's own training images (their pixels: pp_flower.data.dataset_fingerprint),
        computed once: a resume point made from other images at the same ids is not this user's."""
        if self._data_key is None:
            from pp_flower.data import dataset_fingerprint

            self._data_key = dataset_fingerprint(self.images("train")[0][self.ids["train"]])
        return self._data_key

    def image_size(self) -> list[int]:
        return list(self.images("train")[0].shape[-2:])

    def _load_probe(self) -> None:
        """The received gradients kept with the resume point, so a resumed (or rerun) user measures label leakage
        over all of them; a probe of another size or of other images is left out (the measurement restarts)."""
        from pp_flower.label_leakage import LabelProbe

        path = self.out_dir / "label-probe.pt"
        if self.probe is None or not path.exists():
            return
        try:
            probe = LabelProbe.load(path)
        except ValueError as exc:
            log.warning("user %d: %s; label leakage is measured from this run's gradients only", self.index, exc)
            return
        if probe.max_images == self.probe.max_images and bool(torch.isin(probe.ids(), self.ids["train"]).all()):
            self.probe = probe

    def restore(self, blob: dict) -> None:
        self.net.load_state_dict(blob["state_dict"])
        self.opt.state.clear()
        for name, p in self.net.named_parameters():
            if name in blob["momentum"]:
                self.opt.state[p]["momentum_buffer"] = blob["momentum"][name].to(self.device).clone()
        self.progress = Progress.from_dict(blob["progress"])
        self.kept = None

    def save_resume_point(self) -> None:
        blob = self.snapshot()  # on disk, the key also holds the images' fingerprint (a later run may use others)
        save_atomic({**blob, "config": {**blob["config"], "data": self.data_key()}}, self.out_dir / "resume.pt")
        if self.probe is not None:  # the gradients received so far belong to this point too
            self.probe.save(self.out_dir / "label-probe.pt")

    def load_resume_point(self) -> None:
        """Continue from ``out-dir/resume.pt`` (and ``best.pt``) when they belong to this user and config."""
        path = self.out_dir / "resume.pt"
        if not path.exists():
            log.info("user %d: no resume point in %s; h_θ starts afresh", self.index, self.out_dir)
            return
        blob = load_checkpoint(path, "user_state")
        changed, _ = key_changes(blob.get("config") or {}, {**self.resume_key(), "data": self.data_key()})
        if changed:  # a point from before data fingerprints (no "data") is this user's if all else matches
            log.warning("user %d: %s was written by another user, run config or data (%s); h_θ starts afresh",
                        self.index, path, ", ".join(changed[:6]))
            return
        self.restore(blob)
        self._load_probe()
        if (self.out_dir / "best.pt").exists():
            self.best = load_checkpoint(self.out_dir / "best.pt", "transform_net")["state_dict"]
        log.info("user %d: resumed from %s at step %d", self.index, path, self.progress.step)

    # --- training: one message = apply the gradient of the batch sent last, then send the batch wanted next ---
    def step(self, control: dict, grad: np.ndarray | None, weights: dict | None) -> dict:
        """One ``train.step`` message (docs/protocol.md): ``control`` holds grad-step, want and optionally
        refused-step/reason and send-weights; ``grad`` is ∂L_class/∂x̂ (n, C, H, W) of batch grad-step; ``weights``
        the FedAvg'd public h_θ. Returns the reply: the step reached, x̂ of the wanted batch on the run's wire."""
        started = time.perf_counter()
        self._take_gradient(int(control["grad-step"]), grad)
        self._skip_refused(int(control.get("refused-step", protocol.NO_INDEX)), str(control.get("reason", "")))
        if weights is not None:  # fedavg: adopt the averaged public h_θ
            self.net.load_state_dict({k: _tensor(v) for k, v in weights.items()})
            self.kept = None
        reply: dict = {"control": {"step": self.progress.step, "batch": protocol.NO_INDEX}}
        want = int(control["want"])
        if want != protocol.NO_INDEX and want == self.progress.step:
            ids, xhat = self._send_batch(want)
            reply["control"]["batch"] = want
            reply["protected"] = {"xhat": _numpy(encode(xhat, self.cfg.wire)), "ids": _numpy(ids)}
        if int(control.get("send-weights", 0)):
            reply["weights"] = {k: _numpy(v) for k, v in self.net.state_dict().items()}
        reply["metrics"] = {"compute-seconds": time.perf_counter() - started}
        return reply

    def _take_gradient(self, grad_step: int, grad: np.ndarray | None) -> None:
        """Phase 1: apply ∂L_class/∂x̂ of the pending batch (one SGD step of h_θ, Eq. 6); a stale one is ignored."""
        if grad_step == protocol.NO_INDEX:
            return
        step = self.progress.step
        if grad_step != step or not self.progress.pending or grad is None:
            log.warning("user %d: ignoring stale gradient for step %d (at step %d)", self.index, grad_step, step)
            return
        set_lr(self.opt, step // self.steps_per_epoch, self.cfg.epochs, self.cfg.lr)
        grad_cut = _tensor(grad).to(self.device)
        kept, self.kept = self.kept, None
        if kept is not None and kept.step == step:
            grad_feature, l_feat = kept.feature.result()
            user_backward_kept(self.opt, kept.xhat, grad_cut, grad_feature)
            ids = kept.ids
            self.progress.steps_kept += 1
        else:  # the graph was not kept: recompute the forward pass (bit-identical; BN statistics restored)
            ids, x = self.batch(step)
            l_feat = user_backward_recomputed(self.net, self.opt, self.feature_net(), x, grad_cut, self.cfg.alpha)
            self.progress.steps_recomputed += 1
        if self.probe is not None:  # what an honest-but-curious user could learn of the provider's labels
            self.probe.observe(ids, grad_cut)
        self.progress.feature_losses.append(l_feat)
        self.progress.step, self.progress.pending = step + 1, False
        if self.cfg.checkpoint_every and self.progress.step % self.cfg.checkpoint_every == 0:
            self.save_resume_point()

    def _skip_refused(self, refused: int, reason: str) -> None:
        """Phase 2: the provider refused the pending batch (it failed validation): move past it."""
        if refused != protocol.NO_INDEX and refused == self.progress.step and self.progress.pending:
            log.warning("user %d: provider refused batch %d (%s); skipping it", self.index, refused, reason)
            self.kept = None
            self.progress.step, self.progress.pending = refused + 1, False

    def _send_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 3: (ids, x̂) of batch ``step``; asked again (a lost reply), the same x̂ with nothing recomputed."""
        ids, x = self.batch(step)
        if self.progress.pending and self.kept is not None and self.kept.step == step:
            xhat = self.kept.xhat.detach()
        elif self.progress.pending:  # asked again, graph not kept: the same x̂, BatchNorm untouched
            with frozen_batchnorm_statistics(self.net):
                xhat = user_forward(self.net, x)
        else:
            xhat = self._forward(step, ids, x)
        self.progress.pending = True
        return ids, xhat

    def _forward(self, step: int, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x̂_t = h_θ(x_t); when kept, its autograd graph waits in memory for the provider's gradient."""
        if self.keep_graph is False:
            return user_forward(self.net, x)
        if self.keep_graph is None:  # keep-graph=auto: measure the graph once, keep it if memory allows
            held = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t.nbytes) or t, lambda t: t):
                xhat = user_forward_with_graph(self.net, x)
            self.keep_graph = sum(held) * self.hosted <= graph_budget(self.device)
            log.info("user %d: autograd graph of a batch is %.1f MB; %s", self.index, sum(held) / 2**20,
                     "kept between messages" if self.keep_graph else "too big to keep: recomputed per step")
        else:
            xhat = user_forward_with_graph(self.net, x)
        if self.keep_graph:
            # the feature term of Eq. (6) needs no ψ: work it out while x̂ travels and the provider runs ψ
            if overlap_feature_gradient(self.device):
                feature = _BACKGROUND.submit(feature_gradient, self.feature_net(), x, xhat, self.cfg.alpha)
            else:
                feature = Future()
                feature.set_result(feature_gradient(self.feature_net(), x, xhat, self.cfg.alpha))
            self.kept = KeptBatch(step, ids, xhat, feature)
        return xhat.detach()

    # --- evaluation ------------------------------------------------------------------------------------
    def _eval_net(self, phase: str) -> UNet:
        if phase == "test" and self.best is not None:
            best = unet_from_state_dict(self.best, self.cfg.unet_base, self.cfg.unet_depth, self.cfg.unet_arch)
            return best.to(self.device).eval()
        return self.net.eval()

    def evaluate(self, control: dict, result: dict | None) -> dict:
        """Validation / test in chunks: take the provider's results for the last chunk, send the next one.

        Idempotent: a request repeated after a lost or late reply (the provider retries after step-timeout) gets the
        same reply again, and nothing is counted twice."""
        phase, want, result_chunk = str(control["phase"]), int(control["want"]), int(control["result-chunk"])
        request = (phase, want, result_chunk, self.progress.step)
        if self.last_eval is not None and self.last_eval[0] == request:
            log.warning("user %d: %s chunk %d asked again (a reply was lost or late); the same reply", self.index,
                        phase, want)
            return self.last_eval[1]
        reply = self._evaluate(phase, want, result_chunk, result)
        self.last_eval = (request, reply)
        return reply

    def _evaluate(self, phase: str, want: int, result_chunk: int, result: dict | None) -> dict:
        if want == 0:
            self.acc = {}
        acc = self.acc
        if result:
            key = next(iter(result))
            have = len(acc[key]) if key in acc else 0
            if have != result_chunk * self.cfg.eval_chunk:
                raise RuntimeError(f"{phase} results for chunk {result_chunk} arrived out of order ({have} held)")
            for key, value in result.items():
                value = _tensor(value)
                acc[key] = torch.cat([acc[key], value]) if key in acc else value
        reply: dict = {"control": {"step": self.progress.step, "batch": protocol.NO_INDEX}}
        if want != protocol.NO_INDEX:
            ids = self.ids[phase][want * self.cfg.eval_chunk:(want + 1) * self.cfg.eval_chunk]
            images, _ = self.images(phase)
            x = to_float(images[ids]).to(self.device)
            net = self._eval_net(phase)
            with torch.no_grad():
                xhat = net(x)
                phi = self.feature_net()  # L_feat is the user's own term, on x̂ itself (as in training)
                extra = {"feat": ((phi(xhat) - phi(x)) ** 2).flatten(1).mean(1).cpu()}
                xhat = provider_view(xhat, self.cfg.wire)  # what the provider holds: sent, and measured
                if phase == "test":
                    from pp_flower.metrics import psnr, ssim  # torchmetrics: only on the test path (import cost)

                    extra.update(psnr=psnr(xhat, x).cpu(), ssim=ssim(xhat, x).cpu())
            for key, value in extra.items():
                acc[key] = torch.cat([acc[key], value]) if key in acc else value
            reply["control"]["batch"] = want
            reply["protected"] = {"xhat": _numpy(encode(xhat, self.cfg.wire)), "ids": _numpy(ids)}
        else:
            reply["metrics"] = self._finish_phase(phase, acc)
            self.acc = {}
        return reply

    def _finish_phase(self, phase: str, acc: dict[str, torch.Tensor]) -> dict:
        from pp_flower.metrics import summary

        if phase == "val":
            l_class, l_feat = acc["ce"].mean().item(), acc["feat"].mean().item()
            l_trans = l_class - self.cfg.alpha * l_feat
            epoch = self.progress.step // self.steps_per_epoch
            self.progress.val_curve.append(l_trans)
            if l_trans < self.progress.best_val:
                self.progress.best_val, self.progress.best_epoch = l_trans, epoch
                self.best = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
                save_atomic(transform_blob(self.net, self.image_size(), alpha=self.cfg.alpha, epoch=epoch,
                                           val_transform_loss=l_trans, wire=self.cfg.wire),
                            self.out_dir / "best.pt")
            save_atomic(transform_blob(self.net, self.image_size(), alpha=self.cfg.alpha, epoch=epoch,
                                       wire=self.cfg.wire), self.out_dir / "final.pt")
            if epoch in self.cfg.kept_epochs():  # h_θ after E epochs, for the budget curve
                save_atomic(transform_blob(self.net, self.image_size(), alpha=self.cfg.alpha, epoch=epoch,
                                           wire=self.cfg.wire), self.out_dir / f"epoch-{epoch}.pt")
            self.save_resume_point()
            return {"val-class-loss": l_class, "val-feature-loss": l_feat, "val-transform-loss": l_trans,
                    "epoch": epoch}
        ids = self.ids["test"][: len(acc["correct"])]
        accuracy = acc["correct"].double().mean().item()  # the provider says right/wrong; no labels here
        metrics = {
            "user": self.index, "alpha": self.cfg.alpha, "test-accuracy": accuracy, "n-test": len(ids),
            "protected-psnr": summary(acc["psnr"]), "protected-ssim": summary(acc["ssim"]),
            "test-feature-loss": acc["feat"].mean().item(),
            "val-transform-loss-curve": list(self.progress.val_curve),
            "best-epoch": self.progress.best_epoch, "steps": self.progress.step,
            "train-feature-loss-curve": list(self.progress.feature_losses),
            "graph-mode": self.graph_mode, "wire": self.cfg.wire,
            "label-leakage": self._label_leakage(),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self._write_grid(ids[:8])
        # medians, as metrics.json, deploy-local, demo and the README report them (labels say "median")
        leak = metrics["label-leakage"] or {}
        return {"test-accuracy": accuracy, "protected-psnr": metrics["protected-psnr"]["median"],
                "protected-ssim": metrics["protected-ssim"]["median"],
                **{f"label-{k}": v for k, v in leak.items() if isinstance(v, (int, float)) and v is not None}}

    def _label_leakage(self) -> dict | None:
        """What this user infers of the provider's labels from the gradients it received (Li et al. 2022's
        direction and norm attacks, pp_flower.label_leakage). The data set's labels only *score* the guesses
        (and give the 10 per class the known-labels attack assumes): no label ever reached this user's trainer."""
        if self.probe is None or len(self.probe) < 2:
            return None
        self.probe.save(self.out_dir / "label-probe.pt")  # `ppflower attack --labels` recomputes from it
        labels = self.images("train")[1]
        try:
            return self.probe.report(labels, n_classes=int(labels.max()) + 1)
        except ValueError as exc:  # e.g. fewer images than classes: say so, do not fail the run
            return {"error": str(exc)}

    def _write_grid(self, ids: torch.Tensor) -> None:
        from pp_flower.report import save_pairs_grid

        images, _ = self.images("test")
        x = to_float(images[ids]).to(self.device)
        with torch.no_grad():
            xhat = self._eval_net("test")(x)
        save_pairs_grid([x.cpu(), xhat.cpu()], ["plain", f"protected (α={self.cfg.alpha:g})"],
                        self.out_dir / f"fig5_alpha{self.cfg.alpha:g}.png")


class UserTrainer:
    """Hosts live users, each reached only with its own secret key (a random token its ClientApp keeps).

    Every method takes and returns plain Python values and numpy arrays, so a Ray actor or an authenticated
    socket can carry the call. A key this trainer does not hold raises ``NotSetUp`` (the provider then sends a
    resume setup); a key held for another user index is refused.
    """

    def __init__(self, num_threads: int = 0):
        self.users: dict[str, LiveUser] = {}
        # the data set of the run being set up, shared by its users here: each user looking it up in the process
        # cache lists and stats its 60,000 files (0.2-0.7 s per user, minutes for 1,000 users)
        self._run_data: tuple[tuple, tuple] | None = None
        if num_threads:
            torch.set_num_threads(num_threads)

    def _user(self, key: str, index: int | None = None) -> LiveUser:
        user = self.users.get(key)
        if user is None:
            raise NotSetUp("its trainer holds no live state: a new or restarted trainer")
        if index is not None and index != user.index:
            raise PPFlowerError(f"refused: a message for user {index} carried user {user.index}'s key")
        return user

    def _threads(self, user: LiveUser) -> None:
        if user.cfg.num_threads and torch.get_num_threads() != user.cfg.num_threads:
            torch.set_num_threads(user.cfg.num_threads)

    def setup(self, key: str, meta: dict, ids: dict[str, np.ndarray], resume: bool = False) -> dict:
        """Create (or recreate) a user's live state from the provider's config and the ids handed to it."""
        user = LiveUser(meta, {k: _tensor(v) for k, v in ids.items()})
        self._threads(user)
        self._share_run_data(user)
        user.images("train")  # load (and cache) the images now, so the first step is not slowed by it
        user.check_data()
        if resume:
            user.load_resume_point()
        user.feature_net()
        self.users[key] = user
        for live in self.users.values():
            live.hosted = len(self.users)
        return {"n-params": sum(p.numel() for p in user.net.parameters()), "n-train": len(user.ids["train"]),
                "step": user.progress.step, "validated": len(user.progress.val_curve)}

    def _share_run_data(self, user: LiveUser) -> None:
        """Give ``user`` the images another user of the same run loaded here (same run dir, data dir and provider
        fingerprint); a user of another run loads them afresh (so files changed between runs are seen)."""
        run = (user.cfg.run_dir, user.cfg.data_dir, user.data_fingerprint)
        if self._run_data is not None and self._run_data[0] == run:
            user._data = self._run_data[1]
        else:
            user.images("train")
            self._run_data = (run, user._data)

    def call(self, key: str, index: int, kind: str, control: dict, arrays: dict | None = None) -> dict:
        """One message of the protocol: ``kind`` is ``step`` or ``evaluate``; ``arrays`` its tensors by record."""
        user = self._user(key, index)
        self._threads(user)
        arrays = arrays or {}
        try:
            if kind == "step":
                grad = (arrays.get(protocol.GRAD) or {}).get("grad")
                return user.step(control, grad, arrays.get(protocol.WEIGHTS))
            if kind == "evaluate":
                return user.evaluate(control, arrays.get(protocol.RESULT))
        except torch.cuda.OutOfMemoryError as exc:
            raise PPFlowerError(f"user {user.index}: out of GPU memory on {user.device} ({exc}). Lower batch-size "
                                "or eval-chunk, set keep-graph=\"recompute\", or give each user a larger GPU share "
                                "(flower-simulation --num-gpus).") from None
        raise PPFlowerError(f"unknown call '{kind}'")

    def export(self, key: str) -> dict:
        """Everything a user holds, for ``context`` mode (no live trainer: state travels in context.state)."""
        user = self._user(key)
        return {**user.snapshot(), "progress": user.progress.to_dict(), "best": user.best, "acc": dict(user.acc)}

    def restore(self, key: str, meta: dict, ids: dict[str, np.ndarray], blob: dict) -> None:
        user = LiveUser(meta, {k: _tensor(v) for k, v in ids.items()})
        user.keep_graph = False  # a graph cannot outlive the process that built it
        self._share_run_data(user)
        user.restore(blob)
        user.best, user.acc = blob.get("best"), dict(blob.get("acc") or {})
        self.users[key] = user

