"""Live users (pp_flower.user.UserTrainer): durability by resume point + exact replay, and who may reach a user."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

from pp_flower.checkpoints import load_transform_net
from pp_flower.config import AppConfig
from tests.test_flower_app import TINY


def _final_weights(run_dir, k):
    net, _ = load_transform_net(run_dir / f"user-{k}" / "final.pt")
    return net.state_dict()


@pytest.mark.slow
def test_killed_trainer_resumes_and_replays_to_a_fault_free_runs_weights(tmp_path, classifier_ckpt):
    """Kill user trainers mid-run (Ray restarts them empty): the users rejoin from their resume points, the provider
    replays the steps after them, and every user's final h_θ equals the fault-free run's (max |Δθ| < 1e-6)."""
    import ray

    from runtime.flower_simulation import simulate
    from sims.main import client_app, server_app, start_trainers

    def config(name):
        return AppConfig.from_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": str(tmp_path / name),
                                          "limit-train": 192, "checkpoint-every": 2, "max-failures": 20,
                                          "keep-graph": "keep"}).to_run_config()

    simulate(server_app, client_app, 2, config("clean"), start_trainers=start_trainers)
    events = {}

    def kill_trainer_after_a_resume_point():
        resume = tmp_path / "faulty" / "user-0" / "resume.pt"
        deadline = time.time() + 300
        while not resume.exists() and time.time() < deadline:
            time.sleep(0.05)
        ray.kill(ray.get_actor("ppflower-trainer-0"), no_restart=False)  # Ray restarts it with no users
        events["killed"] = time.time()

    killer = threading.Thread(target=kill_trainer_after_a_resume_point, daemon=True)
    killer.start()  # it waits for the run's first resume point, by which time Ray and the trainers are up
    simulate(server_app, client_app, 2, config("faulty"), start_trainers=start_trainers)
    killer.join(timeout=60)
    assert "killed" in events
    faulty = json.loads((tmp_path / "faulty" / "run.json").read_text())
    rejoined = [u for u in faulty["users"] if u["rejoins"]]
    assert rejoined, faulty["users"]  # someone lost its live state and came back from its resume point …
    assert all(u["steps-applied"] == 6 and u["active"] for u in faulty["users"])  # … and every user finished
    for k in (0, 1):
        clean, got = _final_weights(tmp_path / "clean", k), _final_weights(tmp_path / "faulty", k)
        worst = max((clean[n].double() - got[n].double()).abs().max().item() for n in clean)
        assert worst < 1e-6, (k, worst)


def _meta(tmp_path, index=0):
    cfg = AppConfig.from_run_config({**TINY, "keep-graph": "keep"}).to_run_config()
    cfg.pop("classifier")
    return {**cfg, "user-index": index, "steps-per-epoch": 1, "out-dir": str(tmp_path / f"user-{index}")}


def test_trainer_refuses_an_unknown_key_and_a_key_for_another_user(tmp_path, splits):
    from pp_flower import protocol
    from pp_flower.errors import PPFlowerError
    from pp_flower.user import NotSetUp, UserTrainer

    trainer = UserTrainer()
    ids = {"train": splits.train_ids[:16].numpy(), "val": splits.val_ids[:8].numpy(),
           "test": splits.test_ids[:8].numpy()}
    trainer.setup("key-of-user-0", _meta(tmp_path, 0), ids)
    trainer.setup("key-of-user-1", _meta(tmp_path, 1), ids)
    want = {"grad-step": protocol.NO_INDEX, "want": 0}
    reply = trainer.call("key-of-user-0", 0, "step", want)
    assert reply["control"]["batch"] == 0 and reply["protected"]["xhat"].shape == (16, 3, 32, 32)
    with pytest.raises(NotSetUp, match=protocol.NOT_SET_UP):  # a guessed key reaches nobody
        trainer.call("not-a-key", 0, "step", want)
    with pytest.raises(PPFlowerError, match="refused: a message for user 1 carried user 0's key"):
        trainer.call("key-of-user-0", 1, "step", want)
    # the refused calls changed nothing: user 0's batch 0 is still pending and is sent again unchanged
    again = trainer.call("key-of-user-0", 0, "step", want)
    assert np.array_equal(again["protected"]["xhat"], reply["protected"]["xhat"])


def test_kept_graph_and_recomputed_forward_give_the_same_step(tmp_path, splits):
    """The same gradient applied through a kept graph and through a recomputed forward pass: identical θ and BN."""
    from pp_flower import protocol
    from pp_flower.user import UserTrainer

    ids = {"train": splits.train_ids[:16].numpy(), "val": splits.val_ids[:8].numpy(),
           "test": splits.test_ids[:8].numpy()}
    grad = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32) * 1e-3
    nets = {}
    for mode in ("keep", "recompute"):
        trainer = UserTrainer(num_threads=1)
        trainer.setup("k", {**_meta(tmp_path), "keep-graph": mode}, ids)
        trainer.call("k", 0, "step", {"grad-step": protocol.NO_INDEX, "want": 0})
        trainer.call("k", 0, "step", {"grad-step": 0, "want": protocol.NO_INDEX}, {protocol.GRAD: {"grad": grad}})
        user = trainer.users["k"]
        assert user.graph_mode == {"keep": "kept", "recompute": "recomputed"}[mode] and user.progress.step == 1
        nets[mode] = {k: v.clone() for k, v in user.net.state_dict().items()}
    for name, value in nets["keep"].items():
        assert torch.allclose(value.double(), nets["recompute"][name].double(), rtol=1e-6, atol=1e-7), name


def test_graph_mode_reports_the_steps_trained_also_after_a_resume(tmp_path, splits):
    """metrics.json's graph-mode counts the steps each way over every resume: a user resumed after its last step
    (a finished run rerun, a restarted trainer) reports how it trained, not "undecided"."""
    from pp_flower import protocol
    from pp_flower.user import UserTrainer

    ids = {"train": splits.train_ids[:16].numpy(), "val": splits.val_ids[:8].numpy(),
           "test": splits.test_ids[:8].numpy()}
    grad = np.zeros((16, 3, 32, 32), dtype=np.float32)
    trainer = UserTrainer(num_threads=1)
    trainer.setup("k", {**_meta(tmp_path), "keep-graph": "auto"}, ids)
    assert trainer.users["k"].graph_mode == "no steps"
    trainer.call("k", 0, "step", {"grad-step": protocol.NO_INDEX, "want": 0})
    trainer.call("k", 0, "step", {"grad-step": 0, "want": protocol.NO_INDEX}, {protocol.GRAD: {"grad": grad}})
    assert trainer.users["k"].graph_mode == "kept"  # auto keeps a graph this small
    trainer.users["k"].save_resume_point()

    restarted = UserTrainer(num_threads=1)  # a new trainer: the user resumes and takes one recomputed step
    restarted.setup("k", {**_meta(tmp_path), "keep-graph": "recompute"}, ids, resume=True)
    user = restarted.users["k"]
    assert user.graph_mode == "kept" and user.progress.step == 1
    restarted.call("k", 0, "step", {"grad-step": protocol.NO_INDEX, "want": 1})
    restarted.call("k", 0, "step", {"grad-step": 1, "want": protocol.NO_INDEX}, {protocol.GRAD: {"grad": grad}})
    assert user.graph_mode == "kept 1, recomputed 1"


def test_an_evaluation_request_asked_again_gets_the_same_reply_and_counts_once(tmp_path, splits):
    """The provider retries a chunk whose reply came too late (step-timeout on a loaded machine): the user answers
    the same again instead of refusing 'results arrived out of order', and counts nothing twice."""
    from pp_flower import protocol
    from pp_flower.user import UserTrainer

    ids = {"train": splits.train_ids[:16].numpy(), "val": splits.val_ids[:8].numpy(),
           "test": splits.test_ids[:8].numpy()}
    trainer = UserTrainer(num_threads=1)
    trainer.setup("k", {**_meta(tmp_path), "eval-chunk": 4}, ids)
    first = trainer.call("k", 0, "evaluate", {"phase": "val", "want": 0, "result-chunk": -1})
    ce = {protocol.RESULT: {"ce": np.ones(4, dtype=np.float32)}}
    second = trainer.call("k", 0, "evaluate", {"phase": "val", "want": 1, "result-chunk": 0}, ce)
    again = trainer.call("k", 0, "evaluate", {"phase": "val", "want": 1, "result-chunk": 0}, ce)  # a retry
    assert again is second or np.array_equal(again["protected"]["xhat"], second["protected"]["xhat"])
    assert len(trainer.users["k"].acc["ce"]) == 4 and len(trainer.users["k"].acc["feat"]) == 8  # counted once
    done = trainer.call("k", 0, "evaluate", {"phase": "val", "want": protocol.NO_INDEX, "result-chunk": 1},
                        {protocol.RESULT: {"ce": np.full(4, 2.0, dtype=np.float32)}})
    assert done["metrics"]["val-class-loss"] == pytest.approx(1.5)  # (4 × 1 + 4 × 2) / 8: nothing doubled
    retried = trainer.call("k", 0, "evaluate", {"phase": "val", "want": protocol.NO_INDEX, "result-chunk": 1},
                           {protocol.RESULT: {"ce": np.full(4, 2.0, dtype=np.float32)}})
    assert retried["metrics"] == done["metrics"] and len(trainer.users["k"].progress.val_curve) == 1
    assert first["control"]["batch"] == 0
