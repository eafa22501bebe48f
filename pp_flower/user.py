"""The user's side of the protocol (one ClientApp per user): owns h_θ, its optimizer, φ and its images.

Flower executes the ClientApp afresh for every message, so everything that must outlive a message lives
in ``context.state`` (per node): the config and sample ids handed out by the provider, h_θ's weights and
BatchNorm statistics, SGD momentum, the best-so-far h_θ, step counters and evaluation accumulators.
Read-only data (decoded images, φ's weights) is cached per worker process by pp_flower.data/features.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message

from pp_flower import protocol as P
from pp_flower.checkpoints import load_checkpoint, save_atomic, transform_blob
from pp_flower.config import AppConfig
from pp_flower.data import load_datasets, to_float
from pp_flower.features import load_feature_net
from pp_flower.models import UNet, unet_from_state_dict
from pp_flower.transform import (apply_class_gradient, init_transform_net, make_optimizer, produce, set_lr,
                                 train_batch, user_seed)

log = logging.getLogger("pp_flower.user")

# context.state keys
S_CONFIG, S_IDS, S_NET, S_OPT, S_BEST, S_PROGRESS, S_EVAL = (
    "pp.config", "pp.ids", "pp.transform_net", "pp.optimizer", "pp.best", "pp.progress", "pp.eval")


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _restore_unet(cfg: AppConfig, record: ArrayRecord, device: str) -> UNet:
    return unet_from_state_dict(record.to_torch_state_dict(), cfg.unet_base, cfg.unet_depth).to(device)


class User:
    """A user's state, loaded from ``context.state`` at the start of a message and saved at its end."""

    def __init__(self, context: Context):
        state = context.state
        if S_CONFIG not in state.config_records:
            raise RuntimeError(f"{P.NOT_SET_UP} (no query.setup message received; a restarted SuperNode?)")
        meta = dict(state.config_records[S_CONFIG])
        self.index = int(meta.pop("user-index"))
        self.steps_per_epoch = int(meta.pop("steps-per-epoch"))
        self.out_dir = Path(str(meta.pop("out-dir")))
        self.cfg = AppConfig.from_run_config(meta)
        if self.cfg.num_threads:
            torch.set_num_threads(self.cfg.num_threads)
        self.device = _device(self.cfg.user_device)
        self.context = context
        self.ids = {k: P.array_tensor(a) for k, a in state.array_records[S_IDS].items()}
        self.progress = dict(state.config_records[S_PROGRESS])
        self.net = _restore_unet(self.cfg, state.array_records[S_NET], self.device)
        self.opt = make_optimizer(self.net, self.cfg.lr, self.cfg.momentum, self.cfg.weight_decay)
        if S_OPT in state.array_records:
            buffers = state.array_records[S_OPT].to_torch_state_dict()
            for name, p in self.net.named_parameters():
                if name in buffers:
                    self.opt.state[p]["momentum_buffer"] = buffers[name].to(self.device)
        self._data = None
        self._phi = None

    # --- setup -----------------------------------------------------------------------------------------
    @staticmethod
    def setup(context: Context, msg: Message) -> dict:
        """Store the provider's config and the sample ids handed to this user; initialise h_θ."""
        content = msg.content
        meta = dict(content.config_records[P.CONFIG])
        resume = bool(int(meta.pop("resume", 0)))
        cfg = AppConfig.from_run_config({k: v for k, v in meta.items()
                                         if k not in ("user-index", "steps-per-epoch", "out-dir")})
        for key, value in context.node_config.items():  # a user's own machine may override data paths
            if key in ("data-dir", "vgg-weights", "user-device", "num-threads"):
                meta[key] = value
        meta["out-dir"] = str(context.node_config.get("out-dir", meta["out-dir"]))
        net = init_transform_net(cfg.unet_base, cfg.unet_depth, cfg.seed, int(meta["user-index"]))
        state = context.state
        state[S_CONFIG] = ConfigRecord(meta)
        state[S_IDS] = ArrayRecord({k: P.tensor_array(v) for k, v in P.get_tensors(content, P.IDS).items()})
        state[S_NET] = ArrayRecord(net.state_dict())
        state[S_PROGRESS] = ConfigRecord({"step": 0, "pending": False, "best-val": float("inf"), "best-epoch": -1,
                                          "val-curve": [0.0][:0], "feature-losses": [0.0][:0]})
        for key in (S_OPT, S_BEST, S_EVAL):
            if key in state:
                del state[key]
        user = User(context)
        if resume:
            user.load_resume_point()
        user.images("train")  # load (and cache) the images now, so the first step is not slowed by it
        user.feature_net()
        return {"n-params": sum(p.numel() for p in net.parameters()), "n-train": len(user.ids["train"]),
                "step": int(user.progress["step"])}

    # --- resume points (a restarted SuperNode loses context.state; its disk keeps these) -----------------
    def save_resume_point(self) -> None:
        buffers = {name: self.opt.state[p]["momentum_buffer"].cpu() for name, p in self.net.named_parameters()
                   if "momentum_buffer" in self.opt.state.get(p, {})}
        progress = {**self.progress, "pending": False}
        save_atomic({"kind": "user_state", "user-index": self.index, "unet-base": self.cfg.unet_base,
                     "alpha": self.cfg.alpha, "state_dict": {k: v.cpu() for k, v in self.net.state_dict().items()},
                     "momentum": buffers, "progress": progress}, self.out_dir / "resume.pt")

    def load_resume_point(self) -> None:
        """Continue from ``out-dir/resume.pt`` (and ``best.pt``) when they belong to this user and config."""
        path = self.out_dir / "resume.pt"
        if not path.exists():
            log.warning("user %d: no resume point in %s; starting h_θ afresh", self.index, self.out_dir)
            return
        blob = load_checkpoint(path, "user_state")
        if (blob["user-index"], blob["unet-base"], blob["alpha"]) != (self.index, self.cfg.unet_base, self.cfg.alpha):
            log.warning("user %d: %s belongs to another user or config; starting h_θ afresh", self.index, path)
            return
        self.net.load_state_dict(blob["state_dict"])
        for name, p in self.net.named_parameters():
            if name in blob["momentum"]:
                self.opt.state[p]["momentum_buffer"] = blob["momentum"][name].to(self.device)
        self.progress = dict(blob["progress"])
        if (self.out_dir / "best.pt").exists():
            best = load_checkpoint(self.out_dir / "best.pt", "transform_net")
            self.context.state[S_BEST] = ArrayRecord(best["state_dict"])
        self.save()
        log.info("user %d: resumed from %s at step %d", self.index, path, int(self.progress["step"]))

    def save(self) -> None:
        state = self.context.state
        state[S_NET] = ArrayRecord({k: v.cpu() for k, v in self.net.state_dict().items()})
        buffers = {name: self.opt.state[p]["momentum_buffer"].cpu() for name, p in self.net.named_parameters()
                   if "momentum_buffer" in self.opt.state.get(p, {})}
        if buffers:
            state[S_OPT] = ArrayRecord(buffers)
        state[S_PROGRESS] = ConfigRecord(self.progress)

    # --- data ------------------------------------------------------------------------------------------
    def images(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, labels) of the full train or test set; ids index into them."""
        if self._data is None:
            self._data = load_datasets(self.cfg.data_dir or None)
        ds = self._data[0] if part in ("train", "val") else self._data[1]
        return ds.images, ds.labels

    def feature_net(self):
        if self._phi is None:
            self._phi = load_feature_net(self.cfg.vgg_weights or None, self.cfg.feature_layer, self.device)
        return self._phi

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, _ = self.images("train")
        ids, x = train_batch(images, self.ids["train"], step, self.steps_per_epoch, self.cfg.batch_size,
                             user_seed(self.cfg.seed, self.index), self.cfg.augment)
        return ids, x.to(self.device)

    # --- training --------------------------------------------------------------------------------------
    def step(self, msg: Message) -> dict:
        """Apply the provider's gradient for the pending batch (if any), then produce the wanted batch."""
        started = time.perf_counter()
        control = msg.content.config_records[P.CONTROL]
        grad_step, want = int(control["grad-step"]), int(control["want"])
        refused = int(control.get("refused-step", P.NONE))
        step = int(self.progress["step"])
        if grad_step != P.NONE:
            if grad_step == step and self.progress["pending"]:
                grad = P.get_tensors(msg.content, P.GRAD)["grad"]
                _, x = self.batch(step)
                set_lr(self.opt, step // self.steps_per_epoch, self.cfg.epochs, self.cfg.lr)
                l_feat = apply_class_gradient(self.net, self.opt, self.feature_net(), x, grad, self.cfg.alpha)
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
            self.progress.update(step=step + 1, pending=False)
        if P.WEIGHTS in msg.content.array_records:  # fedavg: adopt the averaged public h_θ
            self.net.load_state_dict(msg.content.array_records[P.WEIGHTS].to_torch_state_dict())
        step = int(self.progress["step"])
        reply: dict = {"control": {"step": step, "batch": P.NONE}}
        if want != P.NONE and want == step:
            ids, x = self.batch(step)
            if self.progress["pending"]:  # asked again (e.g. after a lost reply): same x̂, BN untouched
                saved = {n: b.clone() for n, b in self.net.named_buffers()}
                xhat = produce(self.net, x)
                self.net.load_state_dict({**self.net.state_dict(), **saved})
            else:
                xhat = produce(self.net, x)
            self.progress["pending"] = True
            reply["control"]["batch"] = step
            reply["protected"] = {"xhat": xhat.cpu(), "ids": ids}
        if int(control.get("send-weights", 0)):
            reply["weights"] = {k: v.cpu() for k, v in self.net.state_dict().items()}
        self.save()
        reply["metrics"] = {"compute-seconds": time.perf_counter() - started}
        return reply

    # --- evaluation ------------------------------------------------------------------------------------
    def _eval_net(self, phase: str) -> UNet:
        if phase == "test" and S_BEST in self.context.state.array_records:
            return _restore_unet(self.cfg, self.context.state.array_records[S_BEST], self.device).eval()
        return self.net.eval()

    def evaluate(self, msg: Message) -> dict:
        """Validation / test in chunks: take the provider's results for the last chunk, send the next one."""
        control = msg.content.config_records[P.CONTROL]
        phase, want, result_chunk = str(control["phase"]), int(control["want"]), int(control["result-chunk"])
        ids_all = self.ids[phase]
        state = self.context.state
        acc = P.get_tensors(state, S_EVAL) if want != 0 and S_EVAL in state.array_records else {}
        result = P.get_tensors(msg.content, P.RESULT)
        if result:
            have = len(acc[next(iter(result))]) if next(iter(result)) in acc else 0
            if have != result_chunk * self.cfg.eval_chunk:
                raise RuntimeError(f"{phase} results for chunk {result_chunk} arrived out of order ({have} held)")
            for key, value in result.items():
                acc[key] = torch.cat([acc[key], value]) if key in acc else value
        reply: dict = {"control": {"step": int(self.progress["step"]), "batch": P.NONE}}
        if want != P.NONE:
            ids = ids_all[want * self.cfg.eval_chunk:(want + 1) * self.cfg.eval_chunk]
            images, _ = self.images(phase)
            x = to_float(images[ids]).to(self.device)
            net = self._eval_net(phase)
            with torch.no_grad():
                xhat = net(x)
                phi = self.feature_net()
                fx, fxh = phi(x), phi(xhat)
                per_sample_feat = ((fxh - fx) ** 2).flatten(1).mean(1).cpu()
                extra = {"feat": per_sample_feat}
                if phase == "test":
                    from pp_flower.metrics import psnr, ssim  # torchmetrics: only on the test path (import cost)

                    extra.update(psnr=psnr(xhat, x).cpu(), ssim=ssim(xhat, x).cpu())
            for key, value in extra.items():
                acc[key] = torch.cat([acc[key], value]) if key in acc else value
            reply["control"]["batch"] = want
            reply["protected"] = {"xhat": xhat.cpu(), "ids": ids}
        else:
            reply["metrics"] = self._finish_phase(phase, acc)
            acc = {}
        if acc:
            state[S_EVAL] = ArrayRecord({k: P.tensor_array(v) for k, v in acc.items()})
        elif S_EVAL in state:
            del state[S_EVAL]
        self.save()
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
                self.context.state[S_BEST] = ArrayRecord({k: v.cpu() for k, v in self.net.state_dict().items()})
                save_atomic(transform_blob(self.net, alpha=self.cfg.alpha, epoch=epoch, val_transform_loss=l_trans),
                            self.out_dir / "best.pt")
            save_atomic(transform_blob(self.net, alpha=self.cfg.alpha, epoch=epoch), self.out_dir / "final.pt")
            self.save_resume_point()
            return {"val-class-loss": l_class, "val-feature-loss": l_feat, "val-transform-loss": l_trans,
                    "epoch": epoch}
        ids = self.ids["test"][: len(acc["correct"])]
        accuracy = acc["correct"].double().mean().item()  # the provider says right/wrong; no labels here
        metrics = {
            "user": self.index, "alpha": self.cfg.alpha, "test_accuracy": accuracy, "n_test": len(ids),
            "protected_psnr": summary(acc["psnr"]), "protected_ssim": summary(acc["ssim"]),
            "test_feature_loss": acc["feat"].mean().item(),
            "val_transform_loss_curve": list(self.progress["val-curve"]),
            "best_epoch": int(self.progress["best-epoch"]), "steps": int(self.progress["step"]),
            "train_feature_loss_curve": list(self.progress["feature-losses"]),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self._write_grid(ids[:8])
        return {"test-accuracy": accuracy, "protected-psnr": metrics["protected_psnr"]["mean"],
                "protected-ssim": metrics["protected_ssim"]["mean"]}

    def _write_grid(self, ids: torch.Tensor) -> None:
        from pp_flower.report import save_pairs_grid

        images, _ = self.images("test")
        x = to_float(images[ids]).to(self.device)
        with torch.no_grad():
            xhat = self._eval_net("test")(x)
        save_pairs_grid([x.cpu(), xhat.cpu()], ["plain", f"protected (α={self.cfg.alpha:g})"],
                        self.out_dir / f"fig5_alpha{self.cfg.alpha:g}.png")


def reply_message(msg: Message, reply: dict) -> Message:
    """Turn a handler's dict into the reply Message (the only way user data leaves the user)."""
    content = P.make_content(control=reply.get("control"), metrics=reply.get("metrics"),
                             **{P.PROTECTED: reply.get("protected"), P.WEIGHTS: reply.get("weights")})
    return Message(content=content, reply_to=msg)
