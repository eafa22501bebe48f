"""The cloud provider as a Flower strategy: holds ψ and the labels, drives training, validation and testing.

Per training step the provider (1) sends every active user the gradient of its last batch and asks for
the next one, (2) checks each reply (shape, dtype, range, finiteness, sample ids) before any of it reaches
ψ, (3) runs ψ once over all users' protected images together and (4) keeps each user's ∂L_class/∂x̂ for
the next message. One round trip per SGD step; see docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from pp_flower import protocol
from pp_flower.checkpoints import load_classifier, save_atomic, transform_blob
from pp_flower.classifier import chance_line_of
from pp_flower.config import AppConfig, check_app_inputs, require_classifier, resolve_device
from pp_flower.data import index_fingerprint, load_splits, user_shards
from pp_flower.errors import PPFlowerError
from pp_flower.models import UNet
from pp_flower.progress import Bar
from pp_flower.transform import provider_cut_gradients, steps_per_epoch

log = logging.getLogger("pp_flower.provider")


def write_run_summary(path: Path, summary: dict) -> None:
    """Write ``run.json``: this run's summary, with every earlier run into the same run dir under "earlier-runs".

    A rerun resumes (and a rerun of a finished run trains nothing): its rounds and curves are only its own, so the
    summaries of the runs before it are kept, oldest first, instead of being overwritten. An earlier run.json that
    cannot be read as a JSON object is moved aside (``run.json.unreadable-N``), never lost; an "earlier-runs" that
    is not a list stays, untouched, inside the record of the run that had it. Written whole or not at all; raises
    PPFlowerError (one line) when the run dir cannot take it.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        earlier: list = []
        if path.exists() or path.is_symlink():
            try:
                before = json.loads(path.read_text())
                if not isinstance(before, dict):
                    raise ValueError("not a JSON object")
                chain = before.get("earlier-runs")
                if isinstance(chain, list):
                    del before["earlier-runs"]
                    earlier = [*chain, before]
                else:
                    earlier = [before]
            except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
                n = 1
                while os.path.lexists(path.with_name(f"{path.name}.unreadable-{n}")):
                    n += 1
                aside = path.with_name(f"{path.name}.unreadable-{n}")
                os.replace(path, aside)
                log.warning("the earlier %s could not be read (%s); kept as %s", path.name,
                            str(exc).splitlines()[0][:200], aside.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**summary, "earlier-runs": earlier}, indent=2))
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # (no directory to hold it either)
            pass
        raise PPFlowerError(f"cannot write the run summary {path}: {exc.strerror or exc}") from None


MessageLog = Callable[[str, Message], None]  # ("to-user" | "to-provider", message)


@dataclass
class Pending:
    """∂L_class/∂x̂ of a user's batch ``step``, computed and not yet acknowledged by the user."""

    step: int
    grad: torch.Tensor
    class_loss: float


@dataclass
class EvalPass:
    """One user's way through a validation or test pass, one chunk of images per evaluation round."""

    phase: str                        # "val" or "test"
    chunk: int = 0                    # the chunk wanted next
    results: dict | None = None       # ψ's results for the chunk before it, sent with the next request
    metrics: dict | None = None       # the user's metrics, once it has every result


@dataclass
class Timing:
    """Where a run's training time went (run.json's "timing", hyphenated there; seconds and bytes)."""

    train_seconds: float = 0.0
    wait: float = 0.0                   # from sending a round's messages to the last reply
    user_compute_critical: float = 0.0  # per round, the slowest user's compute, summed
    user_compute_total: float = 0.0
    provider_compute: float = 0.0
    steps: int = 0
    train_images: int = 0
    bytes_to_provider: int = 0
    bytes_to_users: int = 0

    def to_json(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}


@dataclass(eq=False)
class UserTrack:
    """What the provider knows about one user."""

    node_id: int
    index: int
    ids: dict[str, torch.Tensor]
    applied: int = 0                 # SGD steps the user reported as applied
    pending: Pending | None = None   # gradient not yet acknowledged by the user
    refused: tuple[int, str] | None = None
    failures: int = 0
    active: bool = True
    needs_setup: bool = False        # its SuperNode restarted with the same node id and lost its state
    rejoins: list[tuple[int, int, int]] = field(default_factory=list)  # (provider round, node id, resumed step)
    dropped_steps: list[tuple[int, str]] = field(default_factory=list)
    class_losses: list[float] = field(default_factory=list)
    final_metrics: dict = field(default_factory=dict)
    val_metrics: list[dict] = field(default_factory=list)
    validated: int = 0               # epochs validated before this run started (a rerun resumed the user)
    wanted: int = -1                 # the batch asked for in this training round (protocol.NO_INDEX: none)
    evaluation: EvalPass | None = None

    def next_batch(self) -> int:
        if self.pending is not None:
            return self.pending.step + 1
        if self.refused is not None:
            return self.refused[0] + 1
        return self.applied

    def done(self, end: int) -> bool:
        return self.pending is None and self.applied >= end


class ProviderStrategy(Strategy):
    """The semi-trusted cloud provider of the paper's framework (Sec. III), as a Flower strategy.

    Flower's vocabulary, with split learning's meaning: a *training round* is one SGD step of every active user
    (``configure_train``: each user's pending ∂L_class/∂x̂ and the batch wanted next; ``aggregate_train``: check
    the replies and run ψ once over all users' x̂), and an *evaluation round* is one chunk of validation or test
    images (``configure_evaluate`` / ``aggregate_evaluate``). ``start`` owns the loop — fast polling, setup,
    rejoins, optional FedAvg of the public h_θ — and returns Flower's ``Result``.
    """

    def __init__(self, cfg: AppConfig, classifier: torch.nn.Module, train_labels: torch.Tensor,
                 ids: dict[str, torch.Tensor], image_shape: tuple[int, ...] = (3, 32, 32),
                 message_log: MessageLog | None = None, test_labels: torch.Tensor | None = None):
        self.cfg = cfg
        self.classifier = classifier.eval()
        self.train_labels = train_labels  # labels of the training set (train and val ids index into it)
        self.test_labels = test_labels if test_labels is not None else train_labels
        self.ids = ids
        self.image_shape = image_shape
        self.message_log = message_log
        self.users: dict[int, UserTrack] = {}
        self.bar = Bar("", None)
        self.public_weights: dict[str, torch.Tensor] | None = None
        self.rounds: list[dict] = []
        self._last_node_check = 0.0
        self.activations: dict[int, str] = {}
        self.microbatch = cfg.provider_microbatch
        if self.microbatch < 0:
            on_gpu = next(classifier.parameters()).device.type == "cuda"
            self.microbatch = 0 if on_gpu else 128  # per training round: wall seconds and images trained
        self.result = Result()
        self.data_fingerprint = ""  # what the ids index (file names and counts; from_config sets it)
        self._usual_wait: float | None = None  # smoothed seconds until every user has replied (deployment polling)
        self.timing = Timing()
        self.steps_per_epoch = 0  # setup() sets it from the smallest shard
        self.noise = torch.Generator().manual_seed(cfg.seed)  # grad-noise draws (the defence), reproducible

    @classmethod
    def from_config(cls, cfg: AppConfig, message_log: MessageLog | None = None) -> "ProviderStrategy":
        """Load ψ (clear error if missing or wrong) and the labels of the images the provider hands out."""
        require_classifier(cfg.classifier)
        classifier, blob = load_classifier(cfg.classifier)
        device = resolve_device(cfg.provider_device, "Run-config key 'provider-device'")
        splits = load_splits(cfg.data_dir or None, seed=cfg.seed, limit_train=cfg.limit_train or None,
                             limit_eval=cfg.limit_eval or None)
        check_app_inputs(cfg, blob, splits.train_all, cfg.classifier)  # also where no preflight ran (flwr run)
        if (warning := chance_line_of(blob)) is not None:  # a ψ at chance makes every number of this run meaningless
            log.warning("ψ (%s): %s", cfg.classifier, warning)
        ids = {"train": splits.train_ids, "val": splits.val_ids, "test": splits.test_ids}
        shape = tuple(splits.train_all.images.shape[1:])
        provider = cls(cfg, classifier.to(device), splits.train_all.labels, ids, shape, message_log,
                       test_labels=splits.test_all.labels)
        provider.data_fingerprint = index_fingerprint(cfg.data_dir or None)  # users check theirs against it
        return provider

    # --- messaging -------------------------------------------------------------------------------------
    def exchange(self, grid: Grid, messages: list[Message], timeout: float, phase: str = "train"
                 ) -> dict[int, Message]:
        """Send, then collect replies as they arrive (Grid.send_and_receive polls every 100 ms): in simulation woken
        by each stored reply, in deployment by polling that sleeps through most of the usual wait."""
        if not messages:
            return {}
        for m in messages:
            self._record("to-users", m, phase)
        sent_to = {}
        ids = list(grid.push_messages(messages))
        for mid, m in zip(ids, messages):
            sent_to[mid] = m.metadata.dst_node_id
        replies: dict[int, Message] = {}
        outstanding = set(ids)
        start = time.perf_counter()
        delay = 0.0005
        cap = 0.005
        # simulation: woken as each reply is stored (runtime.flower_patches), no polling through a user's step
        woken = getattr(grid, "wait_for_replies", None)
        if woken is None and type(grid).__name__ != "InMemoryGrid":
            # In deployment a pull is a TLS request the SuperLink must serve (≈ 10 ms of its CPU): polling every
            # 5 ms through a user's step took the 2-core box's CPU from that step (BENCHMARKS.md). Sleep through
            # most of the usual wait for replies, then poll at 5 ms growing to 50 ms.
            cap = 0.05
            if phase == "train" and self._usual_wait is not None:
                time.sleep(min(0.7 * self._usual_wait, timeout))
        while outstanding:
            # one last pull after the deadline: a pull can itself block for long (Flower retries the objects of a
            # reply whose sender died mid-upload), and replies that arrived meanwhile must not be declared lost
            timed_out = time.perf_counter() - start >= timeout
            for reply in grid.pull_messages(list(outstanding)):
                mid = reply.metadata.reply_to_message_id
                if mid in outstanding:
                    outstanding.discard(mid)
                    replies[sent_to[mid]] = reply
                    self._record("to-provider", reply, phase)
            if not outstanding or timed_out:
                break
            if woken is not None:
                woken(min(0.1, max(0.0, timeout - (time.perf_counter() - start))))
                continue
            time.sleep(delay)
            delay = min(delay * 1.5, cap)
        if phase == "train":
            waited = time.perf_counter() - start
            self.timing.wait += waited
            if not outstanding:
                self._usual_wait = waited if self._usual_wait is None else 0.7 * self._usual_wait + 0.3 * waited
        for mid in outstanding:
            user = self.users.get(sent_to[mid])
            if user is not None:
                self._fail(user, f"no reply within {timeout:g} s")
        return replies

    def _record(self, direction: str, msg: Message, phase: str) -> None:
        if msg.has_content() and phase == "train":
            n = sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())
            if direction == "to-users":
                self.timing.bytes_to_users += n
            else:
                self.timing.bytes_to_provider += n
        if self.message_log is not None:
            self.message_log(direction, msg)

    def _fail(self, user: UserTrack, reason: str, step: int | None = None) -> None:
        user.failures += 1
        user.dropped_steps.append((user.next_batch() if step is None else step, reason))
        log.warning("user %d dropped from this step: %s", user.index, reason)
        if user.failures >= self.cfg.max_failures:
            user.active = False
            log.error("user %d dropped for good after %d consecutive failures", user.index, user.failures)

    def _reply_ok(self, user: UserTrack, reply: Message | None) -> bool:
        if reply is None:
            return False
        if reply.has_error():
            if protocol.NOT_SET_UP in reply.error.reason:
                user.needs_setup = True
            self._fail(user, f"ClientApp error: {reply.error.reason}")
            return False
        return True

    def _message(self, user: UserTrack, message_type: str, control: dict, **arrays) -> Message:
        content = protocol.make_content(control=control, **arrays)
        return Message(content=content, dst_node_id=user.node_id, message_type=message_type)

    # --- the run ---------------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Set users up, train ``epochs`` × steps-per-epoch rounds with validation after each epoch, then test.

        The number of rounds follows from the run config (``num_rounds`` is not used); ``initial_arrays`` is
        unused too (there is no global model: each user's h_θ stays with the user). Writes ``run.json``.
        """
        started = time.time()
        self.summary()
        self.setup(grid)
        with Bar(f"h_θ steps of {len(self.users)} users", self.cfg.epochs * self.steps_per_epoch * len(self.users)
                 ) as self.bar:
            for epoch in range(self.cfg.epochs):
                active = [u for u in self.users.values() if u.active]
                if active and all(u.validated > epoch for u in active):  # a rerun: done before the interruption
                    log.info("epoch %d: trained and validated before this run resumed", epoch + 1)
                    continue
                t0 = time.perf_counter()
                end, since_average = (epoch + 1) * self.steps_per_epoch, 0
                while self._train_round(grid, end):
                    since_average += 1
                    if self.cfg.aggregate == "fedavg" and since_average >= self.cfg.aggregate_every \
                            and not self._epoch_done(end):
                        self.average(grid)
                        since_average = 0
                if self.cfg.aggregate == "fedavg":  # h_θ is public: every epoch ends with one average
                    self.average(grid)
                self.timing.train_seconds += time.perf_counter() - t0
                self._validate(grid, epoch)
        self._test(grid)
        write_run_summary(Path(self.cfg.run_dir) / "run.json", self.run_summary(time.time() - started))
        return self.result

    def _train_round(self, grid: Grid, end: int) -> bool:
        """One SGD step of every active user (a Flower training round); False once every user reached ``end``.

        configure_train → exchange → aggregate_train, as in Flower's ``Strategy.start``, then the bookkeeping.
        """
        self.reconnect(grid)
        server_round = len(self.rounds) + 1
        messages = self.configure_train(server_round, ArrayRecord(), ConfigRecord({"end": end}), grid)
        if not messages:
            return False
        t0 = time.perf_counter()
        replies = self.exchange(grid, messages, self.cfg.step_timeout)
        _, metrics = self.aggregate_train(server_round, replies.values())
        found = dict(metrics or {})
        self.timing.steps += 1
        ended = time.perf_counter()
        self.rounds.append({"seconds": ended - t0, "ended": ended, "images": int(found.pop("round/images", 0)),
                            "user-compute": found.pop("round/user-compute", 0.0),
                            "provider-compute": found.pop("round/provider-compute", 0.0)})
        if found:
            self.result.train_metrics_clientapp[server_round] = MetricRecord(found)
        return True

    def _epoch_done(self, end: int) -> bool:
        return all(u.done(end) for u in self.users.values() if u.active)

    def _validate(self, grid: Grid, epoch: int) -> None:
        val = self.evaluate(grid, "val")
        for user, metrics in val.items():
            user.val_metrics.append(metrics)
            log.info("epoch %d user %d: val L_trans %.4f", epoch + 1, user.index, metrics["val-transform-loss"])
        self.result.evaluate_metrics_clientapp[len(self.rounds)] = MetricRecord(self._per_user(val))

    def _test(self, grid: Grid) -> None:
        for user, metrics in self.evaluate(grid, "test").items():
            user.final_metrics = metrics
            log.info("user %d: test accuracy %.4f, protected PSNR %.2f dB (median)", user.index,
                     metrics["test-accuracy"], metrics["protected-psnr"])
        # the test is a round of its own, after the last training round and its validation
        self.result.evaluate_metrics_clientapp[len(self.rounds) + 1] = MetricRecord(self._per_user(
            {u: u.final_metrics for u in self.users.values() if u.final_metrics}))

    def summary(self) -> None:
        """Log the strategy's configuration, as Flower's strategies do."""
        cfg = self.cfg
        log.info("ProviderStrategy (split learning of h_θ, Ito et al. Sec. III):")
        log.info("\t├── ψ: %s on %s, micro-batch %s", Path(cfg.classifier).name,
                 next(self.classifier.parameters()).device, self.microbatch or "all")
        log.info("\t├── L_trans = CE − α·L_feat, α = %g; %d epochs, batch %d, lr %g", cfg.alpha, cfg.epochs,
                 cfg.batch_size, cfg.lr)
        log.info("\t├── data: %d train / %d val / %d test ids, partition %s", len(self.ids["train"]),
                 len(self.ids["val"]), len(self.ids["test"]), cfg.partition)
        log.info("\t└── users: min %d, step timeout %g s, max failures %d, aggregate %s", cfg.min_users,
                 cfg.step_timeout, cfg.max_failures, cfg.aggregate)

    @staticmethod
    def _per_user(values: dict["UserTrack", dict]) -> dict:
        """One MetricRecord-shaped dict: ``user-K/<metric>`` for every user's scalar metrics."""
        return {f"user-{u.index}/{k}": float(v) for u, m in values.items() for k, v in m.items()
                if isinstance(v, (int, float))}

    def wait_for_users(self, grid: Grid) -> list[int]:
        """The connected users' node ids, once ``min-users`` of them are there (deployment: nodes join late)."""
        wanted = max(1, self.cfg.min_users)
        deadline = time.time() + self.cfg.wait_for_users
        while True:
            nodes = sorted(grid.get_node_ids())
            if len(nodes) >= wanted:
                return nodes
            if time.time() > deadline:
                raise PPFlowerError(f"Only {len(nodes)} of {wanted} users (SuperNodes) connected within "
                                    f"{self.cfg.wait_for_users:g} s.")
            time.sleep(0.2)

    def _setup_message(self, user: UserTrack, node: int, resume: bool = False) -> Message:
        return Message(content=protocol.make_content(config=self.setup_config(user, resume), ids=user.ids),
                       dst_node_id=node, message_type=protocol.SETUP)

    def setup_config(self, user: UserTrack, resume: bool = False) -> dict:
        """What a user's setup message configures (with its ids): the run config without ψ's path, the user's
        index, out-dir and schedule, and the fingerprint of the data set the ids index (no labels)."""
        config = {**self.cfg.to_run_config(), "user-index": user.index, "steps-per-epoch": self.steps_per_epoch,
                  "out-dir": str(Path(self.cfg.run_dir) / f"user-{user.index}"), "resume": int(resume),
                  "data-fingerprint": self.data_fingerprint}
        config.pop("classifier")  # where ψ lives is the provider's business
        return config

    @staticmethod
    def node_activations(grid: Grid) -> dict[int, str]:
        """Online node id → when it last (re)connected; a changed time means its SuperNode restarted."""
        return {n.node_id: getattr(n, "last_activated_at", "") for n in grid.get_nodes()}

    def reconnect(self, grid: Grid) -> None:
        """Give a failing or dropped user its place back when its SuperNode returns.

        A restarted SuperNode keeps its node id when its key is registered (its activation time changes, or it
        answers "not set up"); an unregistered deployment gives it a new id, which takes the vacant place.
        The user resumes from its last resume point (``checkpoint-every``) and redoes the steps after it.
        A user whose trainer restarted empty (it answers "not set up") is resumed the same way, at once.
        Checked at most every 2 s, and only while some user is failing or dropped.
        """
        waiting = [u for u in self.users.values() if u.failures > 0 or not u.active]
        now = time.perf_counter()
        # a user that answered "not set up" (its trainer or SuperNode lost its live state) is resumed at once
        urgent = any(u.needs_setup for u in waiting)
        if not waiting or (now - self._last_node_check < 2.0 and not urgent):
            return
        self._last_node_check = now
        online = self.node_activations(grid)
        fresh = sorted(set(online) - set(self.users))
        for user in waiting:
            restarted = user.node_id in online and online[user.node_id] != self.activations.get(user.node_id)
            if user.node_id in online and (user.needs_setup or restarted):
                node = user.node_id
            elif user.node_id not in online and fresh:
                node = fresh.pop(0)
            else:
                continue
            self.activations[node] = online[node]  # one attempt per (re)connection
            reply = self.exchange(grid, [self._setup_message(user, node, resume=True)], self.cfg.step_timeout,
                                  "setup").get(node)
            if reply is None or reply.has_error():
                log.warning("user %d could not rejoin on node %d: %s", user.index, node,
                            reply.error.reason if reply is not None and reply.has_error() else "no reply")
                continue
            del self.users[user.node_id]
            user.node_id, self.users[node] = node, user
            user.applied = int(reply.content.config_records[protocol.CONTROL]["step"])
            user.pending = user.refused = None
            user.failures, user.active, user.needs_setup = 0, True, False
            user.rejoins.append((self.timing.steps, node, user.applied))
            log.warning("user %d rejoined on node %d, resuming at step %d", user.index, node, user.applied)

    def setup(self, grid: Grid) -> None:
        nodes = self.wait_for_users(grid)
        self.activations = self.node_activations(grid)
        shards = user_shards(len(self.ids["train"]), len(nodes), self.cfg.partition, self.cfg.seed)
        min_shard = min(len(s) for s in shards)
        if min_shard == 0:
            raise PPFlowerError(f"{len(nodes)} users but only {len(self.ids['train'])} training images.")
        self.steps_per_epoch = steps_per_epoch(min_shard, self.cfg.batch_size)  # a 1-image last batch is dropped
        if not self.steps_per_epoch:
            raise PPFlowerError(f"{len(nodes)} users but only {len(self.ids['train'])} training images: each user "
                                "needs at least 2 (BatchNorm cannot train on one image); raise limit-train.")
        messages = []
        for index, (node, shard) in enumerate(zip(nodes, shards)):
            ids = {"train": self.ids["train"][shard], "val": self.ids["val"], "test": self.ids["test"]}
            user = UserTrack(node, index, ids)
            self.users[node] = user
            messages.append(self._setup_message(user, node, resume=True))  # a rerun continues from resume points
        replies = self.exchange(grid, messages, max(self.cfg.step_timeout, 600.0), "setup")
        for node, user in self.users.items():
            if not self._reply_ok(user, replies.get(node)):
                user.active = False
                log.error("user %d failed its setup and takes no part in this run", user.index)
                continue
            content = replies[node].content
            user.applied = int(content.config_records[protocol.CONTROL]["step"])
            user.validated = int(content.metric_records[protocol.METRICS].get("validated", 0)) \
                if protocol.METRICS in content.metric_records else 0
            if user.applied:
                log.info("user %d resumed from its resume point at step %d", user.index, user.applied)
        if not any(u.active for u in self.users.values()):
            first = next((u for u in self.users.values() if u.dropped_steps), None)
            why = ""
            if first is not None:
                lines = [line.strip() for line in first.dropped_steps[-1][1].splitlines() if line.strip()]
                why = f" (user {first.index}: {lines[-1] if lines else 'no reply'})"
            raise PPFlowerError(f"Every user failed its setup{why}; see the log above.")
        log.info("%d users, %d steps per epoch, batch %d", len(nodes), self.steps_per_epoch, self.cfg.batch_size)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> list[Message]:
        """One SGD step's messages, to every active user short of step ``config["end"]``: its pending
        ∂L_class/∂x̂ and the batch it should send next (none once it reaches the end of the epoch)."""
        end = int(config["end"])
        messages = []
        for user in self.users.values():
            if not user.active or user.done(end):
                continue
            want = user.next_batch()
            user.wanted = want if want < end else protocol.NO_INDEX
            control = {"grad-step": user.pending.step if user.pending else protocol.NO_INDEX, "want": user.wanted}
            if user.refused is not None:
                control.update({"refused-step": user.refused[0], "reason": user.refused[1]})
            grad = {"grad": user.pending.grad} if user.pending else None
            messages.append(self._message(user, protocol.STEP, control, **{protocol.GRAD: grad}))
        return messages

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply before any of it reaches ψ, then run ψ once over all users' x̂ (one SGD step each).

        No global arrays come out (each user's h_θ stays with the user). The metrics are each user's L_class of
        this step (``user-K/train-class-loss``) and the round's ``round/images``, ``round/user-compute`` (the
        slowest user's seconds) and ``round/provider-compute`` (seconds).
        """
        by_node = {r.metadata.src_node_id: r for r in replies}
        computes = [float(r.content.metric_records[protocol.METRICS].get("compute-seconds", 0.0))
                    for r in by_node.values() if not r.has_error() and protocol.METRICS in r.content.metric_records]
        self.timing.user_compute_critical += max(computes, default=0.0)
        self.timing.user_compute_total += sum(computes)
        submissions = [(user, sub) for node, user in self.users.items()  # the users' order: ψ's batches are fixed
                       if node in by_node and (sub := self._accept(user, by_node[node])) is not None]
        provider_seconds, found = 0.0, {}
        if submissions:
            t0 = time.perf_counter()
            labels = [self.train_labels[s.ids] for _, s in submissions]
            grads, losses = provider_cut_gradients(self.classifier, [s.xhat for _, s in submissions], labels,
                                                   self.microbatch)
            for (user, sub), g, loss in zip(submissions, grads, losses):
                user.pending = Pending(sub.batch, self._perturb(g), loss)
                user.class_losses.append(loss)
                self.timing.train_images += len(sub.ids)
                found[f"user-{user.index}/train-class-loss"] = loss
            self.bar.advance(len(submissions))
            provider_seconds = time.perf_counter() - t0
            self.timing.provider_compute += provider_seconds
        found.update({"round/images": sum(len(s.ids) for _, s in submissions),
                      "round/user-compute": max(computes, default=0.0), "round/provider-compute": provider_seconds})
        return None, MetricRecord(found)

    def _accept(self, user: UserTrack, reply: Message | None) -> protocol.Submission | None:
        """A user's training reply: the step it reached, and its batch if the batch passes validation."""
        if not self._reply_ok(user, reply):
            return None
        expected = user.next_batch()
        try:
            user.applied = int(reply.content.config_records[protocol.CONTROL]["step"])
        except (KeyError, TypeError, ValueError):
            self._fail(user, "reply refused: control record missing or malformed")
            return None
        if user.pending is not None and user.applied > user.pending.step:
            user.pending = None
        if user.refused is not None and user.applied > user.refused[0]:
            user.refused = None
        try:
            sub = protocol.validate_submission(reply, user.ids["train"], self.image_shape, self.cfg.batch_size,
                                               self.cfg.wire)
            if sub is not None and sub.batch != expected:
                raise protocol.ProtocolError(f"sent batch {sub.batch}, expected batch {expected}")
        except protocol.ProtocolError as exc:
            user.refused = (expected, str(exc))
            self._fail(user, f"reply refused: {exc}", expected)
            return None
        if sub is None and (user.wanted != protocol.NO_INDEX or user.pending is not None):
            self._fail(user, f"no progress (user at step {user.applied}, provider expects batch {expected})")
            return None
        user.failures = 0
        return sub

    def _perturb(self, grad: torch.Tensor) -> torch.Tensor:
        """The grad-noise defence: each image's gradient g plus N(0, σ²I), σ = grad-noise·‖g‖/√d (d = its
        values), so grad-noise = 1 adds noise as large as the gradient itself (measured: results/cpu)."""
        if not self.cfg.grad_noise:
            return grad
        flat = grad.flatten(1)
        sigma = self.cfg.grad_noise * flat.norm(dim=1, keepdim=True) / math.sqrt(flat.shape[1])
        noise = torch.randn(flat.shape, generator=self.noise, dtype=flat.dtype)
        return (flat + sigma * noise).view_as(grad)

    def average(self, grid: Grid) -> None:
        """FedAvg of the users' h_θ (weighted by shard size) into one public h_θ, sent back to every user.

        Users first apply their pending gradient and send their weights; then every user adopts the average.
        SGD momentum stays with each user. h_θ is public by design, so its weights may travel.
        """
        users = [u for u in self.users.values() if u.active]
        messages = []
        for user in users:
            control = {"grad-step": user.pending.step if user.pending else protocol.NO_INDEX,
                       "want": protocol.NO_INDEX, "send-weights": 1}
            messages.append(self._message(user, protocol.STEP, control,
                                          **{protocol.GRAD: {"grad": user.pending.grad} if user.pending else None}))
        replies = self.exchange(grid, messages, self.cfg.step_timeout, "average")
        states, sizes = [], []
        for user in users:
            reply = replies.get(user.node_id)
            if not self._reply_ok(user, reply) or protocol.WEIGHTS not in reply.content.array_records:
                continue
            user.applied = int(reply.content.config_records[protocol.CONTROL]["step"])
            if user.pending is not None and user.applied > user.pending.step:
                user.pending = None
            states.append(reply.content.array_records[protocol.WEIGHTS].to_torch_state_dict())
            sizes.append(len(user.ids["train"]))
        if not states:
            return
        share = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
        average = {}
        for key, ref in states[0].items():
            mean = sum(w * st[key].double() for w, st in zip(share, states))
            average[key] = mean.round().to(ref.dtype) if not ref.is_floating_point() else mean.to(ref.dtype)
        self.public_weights = average
        messages = [self._message(u, protocol.STEP, {"grad-step": protocol.NO_INDEX, "want": protocol.NO_INDEX},
                                  **{protocol.WEIGHTS: average}) for u in users if u.pending is None]
        for node, reply in self.exchange(grid, messages, self.cfg.step_timeout, "average").items():
            self._reply_ok(self.users[node], reply)
        net = UNet(self.cfg.unet_base, self.cfg.unet_depth, arch=self.cfg.unet_arch)
        net.load_state_dict(average)
        save_atomic(transform_blob(net, self.image_shape[-2:], alpha=self.cfg.alpha, aggregate="fedavg"),
                    Path(self.cfg.run_dir) / "public_transform_net.pt")
        log.info("FedAvg of %d users' h_θ → %s", len(states), Path(self.cfg.run_dir) / "public_transform_net.pt")

    def evaluate(self, grid: Grid, phase: str) -> dict[UserTrack, dict]:
        """Validation (ψ's per-sample cross-entropy back) or test (right/wrong back), one chunk per round;
        returns each user's metrics."""
        for user in self.users.values():
            user.evaluation = EvalPass(phase) if user.active else None
        server_round = 0
        while any(u.evaluation is not None and u.evaluation.metrics is None for u in self.users.values()):
            server_round += 1
            messages = self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord({"phase": phase}), grid)
            replies = self.exchange(grid, messages, self.cfg.step_timeout, phase)
            self.aggregate_evaluate(server_round, replies.values())
        done = {u: u.evaluation.metrics for u in self.users.values()
                if u.evaluation and u.evaluation.metrics is not None}
        for user in self.users.values():
            user.evaluation = None
        return done

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> list[Message]:
        """One evaluation chunk per user still evaluating: ψ's results for its last chunk, and the next chunk wanted."""
        phase, messages = str(config["phase"]), []
        for user in self.users.values():
            e = user.evaluation
            if e is None or e.metrics is not None or e.phase != phase:
                continue
            n_chunks = math.ceil(len(user.ids[phase]) / self.cfg.eval_chunk)
            control = {"phase": phase, "want": e.chunk if e.chunk < n_chunks else protocol.NO_INDEX,
                       "result-chunk": e.chunk - 1}
            messages.append(self._message(user, protocol.EVAL, control, **{protocol.RESULT: e.results}))
        return messages

    def aggregate_evaluate(self, server_round: int, replies) -> MetricRecord | None:
        """Check each user's chunk, run ψ once over all of them; a user that has every result answers with its
        metrics (returned as ``user-K/<metric>`` once the user is done)."""
        by_node = {r.metadata.src_node_id: r for r in replies}
        batch, finished = [], {}
        for node, user in self.users.items():
            e = user.evaluation
            if e is None or e.metrics is not None:
                continue
            ok, sub = self._accept_chunk(user, by_node.get(node))
            if not ok:
                if not user.active:  # dropped for good: it leaves the pass
                    user.evaluation = None
            elif sub is None:  # every result in: the user answered with its metrics
                e.metrics = finished[user] = dict(by_node[node].content.metric_records.get(protocol.METRICS, {}))
            else:
                batch.append((user, sub))
        if batch:
            t0 = time.perf_counter()
            with torch.no_grad():
                device = next(self.classifier.parameters()).device
                logits = self.classifier(torch.cat([s.xhat for _, s in batch]).to(device)).cpu()
            for (user, sub), part in zip(batch, torch.split(logits, [len(s.ids) for _, s in batch])):
                if user.evaluation.phase == "val":
                    ce = torch.nn.functional.cross_entropy(part, self.train_labels[sub.ids], reduction="none")
                    user.evaluation.results = {"ce": ce.float()}
                else:  # only right/wrong goes back: the user needs no labels to know its accuracy
                    user.evaluation.results = {"correct": (part.argmax(1) == self.test_labels[sub.ids]).to(torch.uint8)}
                user.evaluation.chunk += 1
            self.timing.provider_compute += time.perf_counter() - t0
        return MetricRecord(self._per_user(finished)) if finished else None

    def _accept_chunk(self, user: UserTrack, reply: Message | None) -> tuple[bool, protocol.Submission | None]:
        """(whether a user's evaluation reply counts, its next chunk — None when it carries the user's metrics)."""
        if not self._reply_ok(user, reply):
            return False, None
        phase = user.evaluation.phase
        try:
            sub = protocol.validate_submission(reply, user.ids[phase], self.image_shape, self.cfg.eval_chunk,
                                               self.cfg.wire)
        except protocol.ProtocolError as exc:
            self._fail(user, f"{phase} reply refused: {exc}")
            return False, None
        user.failures = 0
        return True, sub

    def run_summary(self, wall: float) -> dict:
        """What run.json holds: config, timing, rounds and every user's curves, drops, rejoins and results."""
        t = self.timing.to_json()
        return {
            "config": self.cfg.to_run_config(),
            "wall-seconds": wall,
            "steps-per-epoch": self.steps_per_epoch,
            "timing": {**t, "bytes-per-train-image": (t["bytes-to-provider"] + t["bytes-to-users"])
                       / max(t["train-images"], 1)},
            "rounds": self.rounds,
            "users": [{"index": u.index, "node_id": u.node_id, "active": u.active, "steps-applied": u.applied,
                       "dropped-steps": u.dropped_steps, "rejoins": u.rejoins, "train-class-loss-curve": u.class_losses,
                       "val": u.val_metrics, "test": u.final_metrics}
                      for u in sorted(self.users.values(), key=lambda u: u.index)],
        }

