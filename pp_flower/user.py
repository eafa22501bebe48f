"""The user's live side: h_θ, its optimizer, φ and the images stay in memory between messages.

A ``UserTrainer`` hosts any number of users (one process per GPU or per group of cores, not one per user:
a process that imports torch costs ~300 MB). The per-message ClientApp (``sims.main``) only relays each
message to its user's trainer — a Ray actor in simulation, a process beside the SuperNode in deployment
(``sims.supernode``), or this very process — so a step costs the step's compute plus two small messages,
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
from pathlib import Path

import numpy as np
import torch

from pp_flower import protocol as P
from pp_flower.checkpoints import key_changes, load_checkpoint, save_atomic, transform_blob
from pp_flower.config import AppConfig
from pp_flower.data import load_datasets, to_float
from pp_flower.errors import PPFlowerError
from pp_flower.features import load_feature_net
from pp_flower.models import UNet, unet_from_state_dict
from pp_flower.transform import (apply_class_gradient, class_gradient_step, feature_gradient, init_transform_net,
                                 make_optimizer, produce, produce_with_graph, set_lr, train_batch, user_seed)

log = logging.getLogger("pp_flower.user")

# one background thread per trainer: a kept batch's feature-loss gradient is computed while the provider runs ψ
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pp-feature")
OVERLAP = os.environ.get("PPFLOWER_FEATURE_OVERLAP", "1") != "0"

# keys of the setup config that describe the user, not the run
USER_KEYS = ("user-index", "steps-per-epoch", "out-dir")


class NotSetUp(PPFlowerError):
    """The trainer holds no live state for this user (new trainer, or it restarted): a resume setup is due."""

    def __init__(self, what: str):
        super().__init__(f"{P.NOT_SET_UP} ({what})")


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
        self.progress: dict = {"step": 0, "pending": False, "best-val": float("inf"), "best-epoch": -1,
                               "val-curve": [], "feature-losses": []}
        self.best: dict[str, torch.Tensor] | None = None   # h_θ with the lowest validation L_trans (test uses it)
        self.acc: dict[str, torch.Tensor] = {}              # evaluation results gathered chunk by chunk
        self.graph: tuple | None = None  # (step, x̂ with its graph, future of the feature-loss gradient at x̂)
        self.keep_graph = {"keep": True, "recompute": False}.get(self.cfg.keep_graph)  # None: decide (auto)
        self._data = self._phi = self._data_key = None
        self.hosted = 1  # users sharing this user's trainer (its memory budget for kept graphs)
        self._resume_key = self._make_resume_key()  # fixed for the user's life; snapshots run on hot paths

    @property
    def graph_mode(self) -> str:
        """Which way this user's steps got their autograd graph (BENCHMARKS.md, run.json)."""
        return {True: "kept", False: "recomputed", None: "undecided"}[self.keep_graph]

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
                "alpha": self.cfg.alpha, "config": self.resume_key(), "state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
                "momentum": momentum, "progress": {**self.progress, "pending": False}}

    # run-config keys that change how a run ends, not what h_θ becomes: a resume point ignores them
    MECHANICS = ("run-dir", "step-timeout", "max-failures", "min-users", "wait-for-users", "num-threads",
                 "user-device", "provider-device", "provider-microbatch", "keep-graph", "eval-chunk", "checkpoint-every",
                 "keep-epochs")

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

    def restore(self, blob: dict) -> None:
        self.net.load_state_dict(blob["state_dict"])
        self.opt.state.clear()
        for name, p in self.net.named_parameters():
            if name in blob["momentum"]:
                self.opt.state[p]["momentum_buffer"] = blob["momentum"][name].to(self.device).clone()
        self.progress = dict(blob["progress"])
        self.graph = None

    def save_resume_point(self) -> None:
        blob = self.snapshot()  # on disk, the key also holds the images' fingerprint (a later run may use others)
        save_atomic({**blob, "config": {**blob["config"], "data": self.data_key()}}, self.out_dir / "resume.pt")

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
        if (self.out_dir / "best.pt").exists():
            self.best = load_checkpoint(self.out_dir / "best.pt", "transform_net")["state_dict"]
        log.info("user %d: resumed from %s at step %d", self.index, path, int(self.progress["step"]))

    # --- training --------------------------------------------------------------------------------------
    def _produce(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """x̂_t = h_θ(x_t); when kept, its autograd graph waits in memory for the provider's gradient."""
        if self.keep_graph is False:
            return produce(self.net, x)
        if self.keep_graph is None:  # keep-graph=auto: measure the graph once, keep it if memory allows
            held = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t.nbytes) or t, lambda t: t):
                xhat = produce_with_graph(self.net, x)
            self.keep_graph = sum(held) * self.hosted <= graph_budget(self.device)
            log.info("user %d: autograd graph of a batch is %.1f MB; %s", self.index, sum(held) / 2**20,
                     "kept between messages" if self.keep_graph else "too big to keep: recomputed per step")
        else:
            xhat = produce_with_graph(self.net, x)
        if self.keep_graph:
            # the feature term of Eq. (6) needs no ψ: work it out while x̂ travels and the provider runs ψ
            if OVERLAP:
                feature = _BACKGROUND.submit(feature_gradient, self.feature_net(), x, xhat, self.cfg.alpha)
            else:
                feature = Future()
                feature.set_result(feature_gradient(self.feature_net(), x, xhat, self.cfg.alpha))
            self.graph = (step, xhat, feature)
        return xhat.detach()

    def _apply(self, step: int, grad: torch.Tensor) -> float:
        set_lr(self.opt, step // self.steps_per_epoch, self.cfg.epochs, self.cfg.lr)
        if self.graph is not None and self.graph[0] == step:
            _, xhat, feature = self.graph
            self.graph = None
            grad_feature, l_feat = feature.result()
            class_gradient_step(self.opt, xhat, grad, grad_feature)
            return l_feat
        _, x = self.batch(step)  # recompute the forward pass (bit-identical; BN statistics restored)
        return apply_class_gradient(self.net, self.opt, self.feature_net(), x, grad, self.cfg.alpha)

    def step(self, control: dict, grad: np.ndarray | None, weights: dict | None) -> dict:
        """Apply the provider's gradient for the pending batch (if any), then produce the wanted batch."""
        started = time.perf_counter()
        grad_step, want = int(control["grad-step"]), int(control["want"])
        refused = int(control.get("refused-step", P.NONE))
        step = int(self.progress["step"])
        if grad_step != P.NONE:
            if grad_step == step and self.progress["pending"] and grad is not None:
                l_feat = self._apply(step, _tensor(grad).to(self.device))
                self.progress["feature-losses"] = list(self.progress["feature-losses"]) + [l_feat]
                step += 1
                self.progress.update(step=step, pending=False)
                if self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0:
                    self.save_resume_point()
            else:
                log.warning("user %d: ignoring stale gradient for step %d (at step %d)", self.index, grad_step, step)
        if refused != P.NONE and refused == step and self.progress["pending"]:
            log.warning("user %d: provider refused batch %d (%s); skipping it", self.index, step,
                        control.get("reason", ""))
            self.graph = None
            self.progress.update(step=step + 1, pending=False)
        if weights is not None:  # fedavg: adopt the averaged public h_θ
            self.net.load_state_dict({k: _tensor(v) for k, v in weights.items()})
            self.graph = None
        step = int(self.progress["step"])
        reply: dict = {"control": {"step": step, "batch": P.NONE}}
        if want != P.NONE and want == step:
            ids, x = self.batch(step)
            if self.progress["pending"] and self.graph is not None and self.graph[0] == step:
                xhat = self.graph[1].detach()  # asked again (a lost reply): the same x̂, nothing recomputed
            elif self.progress["pending"]:  # asked again, graph not kept: same x̂, BN untouched
                saved = {n: b.clone() for n, b in self.net.named_buffers()}
                xhat = produce(self.net, x)
                self.net.load_state_dict({**self.net.state_dict(), **saved})
            else:
                xhat = self._produce(step, x)
            self.progress["pending"] = True
            reply["control"]["batch"] = step
            reply["protected"] = {"xhat": _numpy(xhat), "ids": _numpy(ids)}
        if int(control.get("send-weights", 0)):
            reply["weights"] = {k: _numpy(v) for k, v in self.net.state_dict().items()}
        reply["metrics"] = {"compute-seconds": time.perf_counter() - started}
        return reply

    # --- evaluation ------------------------------------------------------------------------------------
    def _eval_net(self, phase: str) -> UNet:
        if phase == "test" and self.best is not None:
            return unet_from_state_dict(self.best, self.cfg.unet_base, self.cfg.unet_depth, self.cfg.unet_arch).to(self.device).eval()
        return self.net.eval()

    def evaluate(self, control: dict, result: dict | None) -> dict:
        """Validation / test in chunks: take the provider's results for the last chunk, send the next one."""
        phase, want, result_chunk = str(control["phase"]), int(control["want"]), int(control["result-chunk"])
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
        reply: dict = {"control": {"step": int(self.progress["step"]), "batch": P.NONE}}
        if want != P.NONE:
            ids = self.ids[phase][want * self.cfg.eval_chunk:(want + 1) * self.cfg.eval_chunk]
            images, _ = self.images(phase)
            x = to_float(images[ids]).to(self.device)
            net = self._eval_net(phase)
            with torch.no_grad():
                xhat = net(x)
                phi = self.feature_net()
                extra = {"feat": ((phi(xhat) - phi(x)) ** 2).flatten(1).mean(1).cpu()}
                if phase == "test":
                    from pp_flower.metrics import psnr, ssim  # torchmetrics: only on the test path (import cost)

                    extra.update(psnr=psnr(xhat, x).cpu(), ssim=ssim(xhat, x).cpu())
            for key, value in extra.items():
                acc[key] = torch.cat([acc[key], value]) if key in acc else value
            reply["control"]["batch"] = want
            reply["protected"] = {"xhat": _numpy(xhat), "ids": _numpy(ids)}
        else:
            reply["metrics"] = self._finish_phase(phase, acc)
            self.acc = {}
        return reply

    def _finish_phase(self, phase: str, acc: dict[str, torch.Tensor]) -> dict:
        from pp_flower.metrics import summary

        if phase == "val":
            l_class, l_feat = acc["ce"].mean().item(), acc["feat"].mean().item()
            l_trans = l_class - self.cfg.alpha * l_feat
            epoch = int(self.progress["step"]) // self.steps_per_epoch
            self.progress["val-curve"] = list(self.progress["val-curve"]) + [l_trans]
            if l_trans < float(self.progress["best-val"]):
                self.progress.update({"best-val": l_trans, "best-epoch": epoch})
                self.best = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
                save_atomic(transform_blob(self.net, self.image_size(), alpha=self.cfg.alpha, epoch=epoch,
                                           val_transform_loss=l_trans),
                            self.out_dir / "best.pt")
            save_atomic(transform_blob(self.net, self.image_size(), alpha=self.cfg.alpha, epoch=epoch),
                        self.out_dir / "final.pt")
            if epoch in self.cfg.kept_epochs():  # h_θ after E epochs, for the budget curve
                save_atomic(transform_blob(self.net, self.image_size(), alpha=self.cfg.alpha, epoch=epoch),
                            self.out_dir / f"epoch-{epoch}.pt")
            self.save_resume_point()
            return {"val-class-loss": l_class, "val-feature-loss": l_feat, "val-transform-loss": l_trans,
                    "epoch": epoch}
        ids = self.ids["test"][: len(acc["correct"])]
        accuracy = acc["correct"].double().mean().item()  # the provider says right/wrong; no labels here
        metrics = {
            "user": self.index, "alpha": self.cfg.alpha, "test-accuracy": accuracy, "n-test": len(ids),
            "protected-psnr": summary(acc["psnr"]), "protected-ssim": summary(acc["ssim"]),
            "test-feature-loss": acc["feat"].mean().item(),
            "val-transform-loss-curve": list(self.progress["val-curve"]),
            "best-epoch": int(self.progress["best-epoch"]), "steps": int(self.progress["step"]),
            "train-feature-loss-curve": list(self.progress["feature-losses"]),
            "graph-mode": self.graph_mode,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self._write_grid(ids[:8])
        # medians, as metrics.json, deploy-local, demo and the README report them (labels say "median")
        return {"test-accuracy": accuracy, "protected-psnr": metrics["protected-psnr"]["median"],
                "protected-ssim": metrics["protected-ssim"]["median"]}

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
        user.images("train")  # load (and cache) the images now, so the first step is not slowed by it
        user.check_data()
        if resume:
            user.load_resume_point()
        user.feature_net()
        self.users[key] = user
        for live in self.users.values():
            live.hosted = len(self.users)
        return {"n-params": sum(p.numel() for p in user.net.parameters()), "n-train": len(user.ids["train"]),
                "step": int(user.progress["step"]), "validated": len(user.progress["val-curve"])}

    def call(self, key: str, index: int, kind: str, control: dict, arrays: dict | None = None) -> dict:
        """One message of the protocol: ``kind`` is ``step`` or ``evaluate``; ``arrays`` its tensors by record."""
        user = self._user(key, index)
        self._threads(user)
        arrays = arrays or {}
        try:
            if kind == "step":
                grad = (arrays.get(P.GRAD) or {}).get("grad")
                return user.step(control, grad, arrays.get(P.WEIGHTS))
            if kind == "evaluate":
                return user.evaluate(control, arrays.get(P.RESULT))
        except torch.cuda.OutOfMemoryError as exc:
            raise PPFlowerError(f"user {user.index}: out of GPU memory on {user.device} ({exc}). Lower batch-size "
                                "or eval-chunk, set keep-graph=\"recompute\", or give each user a larger GPU share "
                                "(flower-simulation --num-gpus).") from None
        raise PPFlowerError(f"unknown call '{kind}'")

    def export(self, key: str) -> dict:
        """Everything a user holds, for ``context`` mode (no live trainer: state travels in context.state)."""
        user = self._user(key)
        return {**user.snapshot(), "progress": dict(user.progress), "best": user.best, "acc": dict(user.acc)}

    def restore(self, key: str, meta: dict, ids: dict[str, np.ndarray], blob: dict) -> None:
        user = LiveUser(meta, {k: _tensor(v) for k, v in ids.items()})
        user.keep_graph = False  # a graph cannot outlive the process that built it
        user.restore(blob)
        user.best, user.acc = blob.get("best"), dict(blob.get("acc") or {})
        self.users[key] = user

    def forget(self, key: str) -> None:
        self.users.pop(key, None)

    def ping(self) -> str:
        return "pong"
