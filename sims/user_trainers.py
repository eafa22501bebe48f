"""Where a user's live trainer runs, and how its per-message ClientApp reaches it.

* ``ray`` (simulation): a pool of ``UserTrainer`` Ray actors, made by ``flower-simulation`` before the run
  (:func:`create_pool`: one per GPU share or per group of cores, users assigned by partition id), so Ray
  places them, gives them their GPU share and spreads them over a Ray cluster. Flower's own Ray workers only
  relay. Under another runner (``flwr run .``'s local simulation) each user gets a trainer actor of its own.
* ``socket`` (deployment): the trainer ``ppflower-supernode`` starts beside the SuperNode, reached over the
  owner-only, secret-authenticated Unix socket of ``pp_flower.channel``.
* ``in-process``: a trainer in this very process (a runtime whose ClientApp process outlives its messages).
* ``context``: no live trainer (plain ``flower-supernode``, one process per message): the user's state travels
  in ``context.state`` every message, as in pp-flower 0.1 — it works, at the per-message cost BENCHMARKS.md shows.

A ClientApp finds its user again with what ``context.state`` keeps: the user's secret key, index and trainer.
"""

from __future__ import annotations

import math
import os
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context

from pp_flower import protocol
from pp_flower.errors import PPFlowerError

POOL_PREFIX = "ppflower-trainer-"
S_SNAPSHOT = "pp.snapshot"
MODES = ("ray", "socket", "in-process", "context")


def mode_of(context: Context) -> str:
    """The node's choice (node config ``user-trainer``), else: socket if configured, ray inside Ray, else context."""
    mode = str(context.node_config.get("user-trainer", ""))
    if mode:
        if mode not in MODES:
            raise PPFlowerError(f"node config user-trainer='{mode}': allowed values are {', '.join(MODES)}.")
        return mode
    if context.node_config.get("trainer-socket") or os.environ.get("PPFLOWER_TRAINER_SOCKET"):
        return "socket"
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return "ray"
    return "context"


# ------------------------------------------------------------------------------------------------- Ray


def _actor_class():
    import ray

    from pp_flower.user import UserTrainer

    return ray.remote(max_restarts=-1, max_task_retries=0)(UserTrainer)


def create_pool(num_users: int, num_cpus: float, num_gpus: float, users_per_trainer: int = 0) -> list[str]:
    """Start the simulation's trainer actors (Ray must be initialised); returns their names.

    GPU shares: one trainer per ``num_gpus`` share of the cluster's GPUs. CPUs: one per ``num_cpus`` group of
    cores, at most one per core. ``users_per_trainer`` > 0 fixes the count instead. Users are assigned by
    partition id; a trainer serves its users one message at a time. Trainers reserve no Ray CPUs (Flower's relay
    workers hold them) and run ``num_cpus`` torch threads each (at least one).
    """
    import ray

    resources = ray.cluster_resources()
    if users_per_trainer > 0:
        count = math.ceil(num_users / users_per_trainer)
    elif num_gpus > 0:
        gpus = resources.get("GPU", 0)
        if gpus < num_gpus:
            raise PPFlowerError(f"--num-gpus {num_gpus:g} per user, but the Ray cluster has {gpus:g} GPUs; lower "
                                "--num-gpus or drop it to train users on CPUs.")
        count = int(gpus / num_gpus + 1e-9)
    else:  # a trainer per num_cpus cores, never more trainers than cores: users share a trainer, not a copy of torch
        count = max(1, int(resources.get("CPU", 1) / max(num_cpus, 1.0) + 1e-9))
    count = max(1, min(count, num_users))
    actor = _actor_class()
    threads = max(1, int(num_cpus))
    names = []
    for k in range(count):
        name = f"{POOL_PREFIX}{k}"
        # the handle is kept: Ray ends an actor once no handle to it exists
        _HANDLES[name] = actor.options(name=name, num_cpus=0,
                                       num_gpus=num_gpus if num_gpus > 0 else 0).remote(threads)
        names.append(name)
    return names


_HANDLES: dict[str, Any] = {}  # trainer name → actor handle, per process


class RayTrainer:
    """A handle on a trainer actor; Ray's errors become one line the provider can read."""

    def __init__(self, name: str):
        self.name = name

    def _actor(self):
        import ray

        if self.name not in _HANDLES:
            _HANDLES[self.name] = ray.get_actor(self.name)
        return _HANDLES[self.name]

    def _get(self, ref):
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except RayTaskError as exc:
            raise RuntimeError(str(exc.cause) if exc.cause is not None else str(exc)) from None
        except RayActorError as exc:
            _HANDLES.pop(self.name, None)
            raise RuntimeError(f"the user's trainer {self.name} died ({exc.__class__.__name__}); it restarts "
                               "empty and the user resumes from its resume point") from None

    def setup(self, *args):
        return self._get(self._actor().setup.remote(*args))

    def call(self, *args):
        return self._get(self._actor().call.remote(*args))


def _ray_trainer_for(context: Context) -> str:
    """The pool's trainer for this user (by partition id), or a trainer of its own when no pool was made."""
    import ray

    pool = sorted((n for n in ray.util.list_named_actors() if n.startswith(POOL_PREFIX)
                   and n[len(POOL_PREFIX):].isdigit()), key=lambda n: int(n[len(POOL_PREFIX):]))
    partition = int(context.node_config.get("partition-id", 0))
    if pool:
        return pool[partition % len(pool)]
    name = f"{POOL_PREFIX}node-{context.node_id}"
    _HANDLES[name] = _actor_class().options(name=name, num_cpus=0, get_if_exists=True).remote(0)
    return name


# ------------------------------------------------------------------------------- in-process and context

_LOCAL: dict[str, Any] = {}


def _local_trainer():
    if "trainer" not in _LOCAL:
        from pp_flower.user import UserTrainer

        _LOCAL["trainer"] = UserTrainer()
    return _LOCAL["trainer"]


class ContextTrainer:
    """No live trainer: the user's state is rebuilt from ``context.state`` and written back every message."""

    def __init__(self, context: Context):
        self.context = context

    def setup(self, key, meta, ids, resume):
        info = _local_trainer().setup(key, meta, ids, resume)
        state = self.context.state
        state["pp.meta"] = ConfigRecord(meta)
        state["pp.ids"] = ArrayRecord({k: protocol.tensor_array(v) for k, v in ids.items()})
        self._save(key)
        return info

    def call(self, key, index, kind, control, arrays):
        trainer, state = _local_trainer(), self.context.state
        if key not in trainer.users:
            if S_SNAPSHOT + ".net" not in state.array_records:
                from pp_flower.user import NotSetUp

                raise NotSetUp("no saved state in this node's context")
            blob = {"state_dict": state[S_SNAPSHOT + ".net"].to_torch_state_dict(),
                    "momentum": state[S_SNAPSHOT + ".momentum"].to_torch_state_dict()
                    if S_SNAPSHOT + ".momentum" in state.array_records else {},
                    "best": state[S_SNAPSHOT + ".best"].to_torch_state_dict()
                    if S_SNAPSHOT + ".best" in state.array_records else None,
                    "acc": state[S_SNAPSHOT + ".acc"].to_torch_state_dict()
                    if S_SNAPSHOT + ".acc" in state.array_records else {},
                    "progress": dict(state[S_SNAPSHOT + ".progress"])}
            ids = {k: a.numpy() for k, a in state["pp.ids"].items()}
            trainer.restore(key, dict(state["pp.meta"]), ids, blob)
        reply = trainer.call(key, index, kind, control, arrays)
        self._save(key)
        return reply

    def _save(self, key):
        blob = _local_trainer().export(key)
        state = self.context.state
        state[S_SNAPSHOT + ".net"] = ArrayRecord(blob["state_dict"])
        for part in ("momentum", "best", "acc"):
            name = f"{S_SNAPSHOT}.{part}"
            if blob.get(part):
                state[name] = ArrayRecord(blob[part])
            elif name in state:
                del state[name]
        state[S_SNAPSHOT + ".progress"] = ConfigRecord(blob["progress"])


# ------------------------------------------------------------------------------------------------ lookup


def trainer_for(context: Context, where: str | None = None):
    """The user's trainer. ``where`` (from context.state) names it again after setup; None picks one."""
    mode = mode_of(context) if where is None else where.split(":", 1)[0]
    if mode == "ray":
        name = where.split(":", 1)[1] if where else _ray_trainer_for(context)
        return RayTrainer(name), f"ray:{name}"
    if mode == "socket":
        from pp_flower.channel import TrainerClient, read_secret

        path = context.node_config.get("trainer-socket") or os.environ["PPFLOWER_TRAINER_SOCKET"]
        secret_file = context.node_config.get("trainer-secret") or os.environ["PPFLOWER_TRAINER_SECRET"]
        timeout = float(os.environ.get("PPFLOWER_TRAINER_TIMEOUT", "600"))
        return TrainerClient(path, read_secret(secret_file), timeout), "socket"
    if mode == "in-process":
        return _local_trainer(), "in-process"
    return ContextTrainer(context), "context"
