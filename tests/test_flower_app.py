"""The Flower app end to end on Flower's simulation engine (Ray), at tiny sizes on real CIFAR-10 images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pp_flower.checkpoints import load_classifier, load_transform_net
from pp_flower.config import AppConfig, format_run_config
from pp_flower.features import load_feature_net
from pp_flower.reference import train_in_process
from runtime.flower_simulation import simulate
from sims.main import start_trainers  # flower-simulation's hook: the users' trainer actors, made before the run
from tests import privacy

TINY = {"limit-train": 48, "batch-size": 16, "unet-base": 4, "unet-depth": 2, "limit-eval": 20, "eval-chunk": 10,
        "alpha": 0.01, "lr": 0.05, "num-threads": 1}


def _config(tmp_path, classifier_ckpt, **overrides):
    cfg = {**TINY, "classifier": str(classifier_ckpt), "run-dir": str(tmp_path / "run"), **overrides}
    return AppConfig.from_run_config(cfg).to_run_config()


@pytest.mark.parametrize("keep_graph,wire", [("keep", "uint8"), ("recompute", "uint8"), ("keep", "float32")])
def test_flower_steps_equal_in_process_steps(tmp_path, classifier_ckpt, splits, vgg_weights, keep_graph, wire):
    """k = 6 SGD steps (2 epochs × 3) of h_θ through the Flower app equal the in-process L_trans loop, whether the
    live user keeps each batch's autograd graph until its gradient arrives or recomputes the forward pass, and
    whichever way x̂ travels (the in-process loss feeds ψ what the provider gets on that wire)."""
    from sims.main import client_app, server_app
    from pp_flower.wire import provider_view

    run_config = _config(tmp_path, classifier_ckpt, epochs=2, augment=False, wire=wire,
                         **{"keep-graph": keep_graph})
    simulate(server_app, client_app, 1, run_config, start_trainers=start_trainers)
    flower_net, blob = load_transform_net(tmp_path / "run" / "user-0" / "final.pt")
    cfg = AppConfig.from_run_config(run_config)
    classifier, _ = load_classifier(classifier_ckpt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the user process (num-threads=1): same float summation order
    try:
        ref_net, _ = train_in_process(cfg, classifier, load_feature_net(vgg_weights), splits.train_all.images,
                                      splits.train_all.labels, splits.train_ids[:48], steps_per_epoch=3)
    finally:
        torch.set_num_threads(threads)
    ref, got = ref_net.state_dict(), flower_net.state_dict()
    params = [name for name, _ in ref_net.named_parameters()]
    worst = max((got[k] - ref[k]).abs().max().item() for k in params)
    assert worst < 1e-5, worst
    for name in set(ref) - set(params):  # BatchNorm statistics (running_var can be large: relative)
        assert torch.allclose(got[name].double(), ref[name].double(), rtol=1e-5, atol=1e-6), name
    assert got["down.0.1.num_batches_tracked"].item() == 6  # updated once per step, not twice
    from pp_flower.transform import init_transform_net

    start = init_transform_net(4, 2, cfg.seed, 0).state_dict()
    assert max((ref[k] - start[k]).abs().max().item() for k in params) > 1e-3  # training really moved θ
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["users"][0]["steps-applied"] == 6 and run["users"][0]["dropped-steps"] == []

    # validation and test through the protocol equal the same quantities computed in-process
    from pp_flower.data import to_float
    from pp_flower.losses import class_loss, feature_loss
    from pp_flower.metrics import psnr

    phi = load_feature_net(vgg_weights)
    x_val = to_float(splits.train_all.images[splits.val_ids[:20]])
    with torch.no_grad():
        ref_net.eval()
        xhat = ref_net(x_val)
        expected = class_loss(classifier(provider_view(xhat, wire)), splits.train_all.labels[splits.val_ids[:20]]) \
            - cfg.alpha * feature_loss(phi(xhat), phi(x_val))
    assert run["users"][0]["val"][-1]["val-transform-loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    best, _ = load_transform_net(tmp_path / "run" / "user-0" / "best.pt")
    x_test = to_float(splits.test_all.images[splits.test_ids[:20]])
    with torch.no_grad():
        protected = provider_view(best(x_test), wire)
        accuracy = (classifier(protected).argmax(1) == splits.test_all.labels[splits.test_ids[:20]]).double().mean()
    metrics = json.loads((tmp_path / "run" / "user-0" / "metrics.json").read_text())
    assert metrics["graph-mode"] == {"keep": "kept", "recompute": "recomputed"}[keep_graph]
    assert metrics["wire"] == run["config"]["wire"] == wire
    assert metrics["test-accuracy"] == pytest.approx(accuracy.item())
    assert metrics["protected-psnr"]["mean"] == pytest.approx(psnr(protected, x_test).mean().item(), rel=1e-4)


def test_privacy_audit_on_every_message(two_user_run, splits, classifier_ckpt):
    """Every message of a 2-user run was recorded (conftest.two_user_run); check contents, not record names."""
    log, run_dir = two_user_run
    to_provider = [m for d, m in log if d == "to-provider"]
    to_users = [m for d, m in log if d == "to-users"]
    types = {m.metadata.message_type for m in to_users}
    assert types == {"query.setup", "train.step", "evaluate.chunk"}
    assert len(to_provider) == len(to_users) > 10

    handed_out = torch.cat([splits.train_ids[:48], splits.val_ids[:20]])
    plain = torch.cat([splits.train_all.images[handed_out], splits.test_all.images[splits.test_ids[:20]]])
    labels_of = {int(i): int(splits.train_all.labels[i]) for i in handed_out}
    labels_of.update({int(i): int(splits.test_all.labels[i]) for i in splits.test_ids[:20]})
    psi = load_classifier(classifier_ckpt)[0].state_dict()
    n_images = 0
    for msg in to_provider:
        assert not msg.has_error()
        assert privacy.plain_image_hits(msg, plain) == []
        assert privacy.label_hits(msg, labels_of) == []
        n_images += sum(a.shape[0] for _, a in privacy.arrays(msg) if len(a.shape) == 4)
        # the default wire: x̂ travels as an 8-bit image, nothing finer (docs/threat-model.md)
        assert all(a.dtype == "uint8" for _, a in privacy.arrays(msg) if len(a.shape) == 4)
    assert n_images >= 48 + 2 * 40  # the audit really saw protected training, validation and test images
    sent_ids = _ids_sent_by_node(to_provider)
    assert all(len(batches) > 5 for batches in sent_ids.values())
    for msg in to_users:
        assert privacy.parameter_hits(msg, psi) == []
        # users train and test without labels: no message to a user carries the labels of any id it holds
        assert privacy.label_hits(msg, labels_of, sent_ids[msg.metadata.dst_node_id]) == []
    # outputs of the run, per user
    psi_model = load_classifier(classifier_ckpt)[0]
    x_test = splits.test_all.images[splits.test_ids[:20]].float() / 255
    y_test = splits.test_all.labels[splits.test_ids[:20]]
    run = json.loads((run_dir / "run.json").read_text())
    for k in (0, 1):
        user_dir = run_dir / f"user-{k}"
        metrics = json.loads((user_dir / "metrics.json").read_text())
        net = load_transform_net(user_dir / "best.pt")[0]
        with torch.no_grad():  # the accuracy the user reports is ψ's on its own h_θ(x), computed here directly
            expected = (psi_model(net(x_test)).argmax(1) == y_test).float().mean().item()
        assert metrics["test-accuracy"] == pytest.approx(expected, abs=1e-6) and metrics["n-test"] == 20
        assert run["users"][k]["test"]["test-accuracy"] == pytest.approx(expected, abs=1e-6)
        assert len(metrics["val-transform-loss-curve"]) == 1
        assert metrics["protected-psnr"]["mean"] < 30
        assert (user_dir / "best.pt").exists() and (user_dir / "fig5_alpha0.01.png").stat().st_size > 1000


def _ids_sent_by_node(to_provider) -> dict[int, list[torch.Tensor]]:
    """Every id vector each user sent to the provider: what the provider's next message to it is about."""
    sent: dict[int, list[torch.Tensor]] = {}
    for msg in to_provider:
        for name, arr in privacy.arrays(msg):
            if name == "ids":
                sent.setdefault(msg.metadata.src_node_id, []).append(torch.from_numpy(arr.numpy().copy()))
    return sent


def test_audit_flags_labels_planted_in_real_messages_to_users(two_user_run, splits):
    """Positive controls on a recorded message: the provider adds the true labels of a user's test ids to its
    test-phase results (a planted fault that once slipped past the audit) — as int64, float32, uint8, one-hot or
    a config list, with no ids in the message."""
    from flwr.app import Message

    from pp_flower import protocol

    log, _ = two_user_run
    sent_ids = _ids_sent_by_node([m for d, m in log if d == "to-provider"])
    labels_of = {int(i): int(splits.test_all.labels[i]) for i in splits.test_ids[:20]}
    # the last test result sent to a user answers the last test chunk that user sent
    msg = [m for d, m in log if d == "to-users" and protocol.RESULT in m.content.array_records
           and "correct" in m.content.array_records[protocol.RESULT]][-1]
    node = msg.metadata.dst_node_id
    correct = torch.from_numpy(msg.content.array_records[protocol.RESULT]["correct"].numpy().copy())
    ids = next(b for b in reversed(sent_ids[node]) if len(b) == len(correct))
    truth = torch.tensor([labels_of[int(i)] for i in ids])
    assert privacy.label_hits(msg, labels_of, sent_ids[node]) == []  # the real message is clean
    plants = {"int64": truth, "float32": truth.float(), "uint8": truth.to(torch.uint8),
              "one-hot": torch.nn.functional.one_hot(truth, 10).float()}
    for kind, leak in plants.items():
        content = protocol.make_content(control=dict(msg.content.config_records[protocol.CONTROL]),
                                 result={"correct": correct, "labels": leak})
        planted = Message(content=content, dst_node_id=node, message_type="evaluate.chunk")
        assert privacy.label_hits(planted, labels_of, sent_ids[node]) == ["labels"], kind
    listed = Message(content=protocol.make_content(control={"labels": truth.tolist()}), dst_node_id=node,
                     message_type="evaluate.chunk")
    assert privacy.label_hits(listed, labels_of, sent_ids[node]) == ["labels"]


def test_audit_checks_can_fail(splits, classifier_ckpt):
    """Positive controls: the audit's checks flag a plain image, a label vector and a ψ tensor."""
    from flwr.app import Message

    from pp_flower import protocol

    ids = splits.train_ids[:8]
    plain = splits.train_all.images[ids]
    leaky = protocol.make_content(control={"step": 0, "batch": 0},
                           protected={"xhat": plain.float() / 255, "ids": ids, "y": splits.train_all.labels[ids]})
    msg = Message(content=leaky, dst_node_id=1, message_type="train.step")
    assert privacy.plain_image_hits(msg, plain) == ["xhat"]
    assert privacy.label_hits(msg, {int(i): int(splits.train_all.labels[i]) for i in ids}) == ["y"]
    psi = load_classifier(classifier_ckpt)[0].state_dict()
    leak = protocol.make_content(grad={"grad": torch.cat([torch.rand(10), psi["fc.weight"].flatten()])})
    assert privacy.parameter_hits(Message(content=leak, dst_node_id=1, message_type="train.step"), psi) == [
        "fc.weight"]


def test_faulty_user_is_dropped_for_a_step_and_malformed_reply_refused(tmp_path, classifier_ckpt):
    import ray.cloudpickle

    from sims.main import server_app
    from tests import faulty_app

    faulty_app.MARKER_DIR = str(tmp_path / "markers")
    ray.cloudpickle.register_pickle_by_value(faulty_app)  # Ray workers get the module by value
    simulate(server_app, faulty_app.app, 2, _config(tmp_path, classifier_ckpt, **{"limit-train": 96}),
             start_trainers=start_trainers)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    user0, user1 = run["users"]
    assert any("injected failure" in reason for _, reason in user1["dropped-steps"])
    assert any("NaN" in reason and step == 1 for step, reason in user0["dropped-steps"])
    for user in (user0, user1):  # both rejoin and finish every step; both are tested
        assert user["active"] and user["steps-applied"] == 3
        reported = json.loads((tmp_path / "run" / f"user-{user['index']}" / "metrics.json").read_text())
        assert user["test"]["test-accuracy"] == pytest.approx(reported["test-accuracy"]) and reported["n-test"] == 20


def _flower_simulation(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "runtime.flower_simulation", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.slow
def test_flower_simulation_cli_writes_outputs(tmp_path, classifier_ckpt):
    rc = format_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": str(tmp_path / "cli")})
    proc = _flower_simulation("--app", "sims.main", "--num-supernodes", "2", "--run-config", rc)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "user 1: test accuracy" in proc.stdout
    assert "\x1b[" not in proc.stdout + proc.stderr  # piped: Flower's log lines come without ANSI colour codes
    for k in (0, 1):
        d = tmp_path / "cli" / f"user-{k}"
        assert {"best.pt", "final.pt", "metrics.json", "fig5_alpha0.01.png"} <= {p.name for p in d.iterdir()}
    run = json.loads((tmp_path / "cli" / "run.json").read_text())
    assert run["timing"]["train-images"] == 48 and run["timing"]["bytes-per-train-image"] > 0


def test_missing_classifier_is_a_clear_error_before_any_round(tmp_path):
    proc = _flower_simulation("--run-config", f'classifier="{tmp_path}/none.pt" run-dir="{tmp_path}/r"', timeout=120)
    assert proc.returncode == 2
    assert "ψ checkpoint" in proc.stderr and "not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_unknown_run_config_key_is_refused():
    from pp_flower.errors import PPFlowerError

    with pytest.raises(PPFlowerError, match="Unknown run-config key 'alpah'"):
        AppConfig.from_run_config({"alpah": 0.1})


def test_fedavg_gives_every_user_the_public_transform_net(tmp_path, classifier_ckpt):
    from sims.main import client_app, server_app

    simulate(server_app, client_app, 2, _config(tmp_path, classifier_ckpt, aggregate="fedavg",
                                                **{"aggregate-every": 2, "limit-train": 64}),
             start_trainers=start_trainers)
    public, _ = load_transform_net(tmp_path / "run" / "public_transform_net.pt")
    users = [load_transform_net(tmp_path / "run" / f"user-{k}" / "final.pt")[0] for k in (0, 1)]
    for name, value in public.state_dict().items():
        for user in users:
            assert torch.equal(user.state_dict()[name], value), name
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert all(u["steps-applied"] == 2 and not u["dropped-steps"] for u in run["users"])


def test_pyproject_run_config_mirrors_app_defaults():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    flwr = pyproject["tool"]["flwr"]["app"]
    assert flwr["components"] == {"serverapp": "sims.main:server_app", "clientapp": "sims.main:client_app"}
    assert flwr["config"] == AppConfig().to_run_config()


@pytest.mark.slow
def test_flwr_run_dot_runs_the_same_app(tmp_path, classifier_ckpt):
    """`flwr run .` (local SuperLink, installed env) runs the app from pyproject's [tool.flwr] section."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    flwr_home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    values = {**TINY, "classifier": str(classifier_ckpt), "run-dir": str(tmp_path / "run")}
    rc = format_run_config(values)
    try:
        proc = subprocess.run(["flwr", "run", ".", "--run-config", rc, "--stream"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=400)
    finally:  # `flwr run` leaves its local SuperLink daemon running
        subprocess.run(["pkill", "-f", str(flwr_home)], check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [u["steps-applied"] for u in run["users"]] == [2, 2]  # 2 simulated SuperNodes, 24 images = 2 batches each
    # the same app, the same config on flower-simulation: every user ends with the same h_θ
    from sims.main import client_app, server_app

    simulate(server_app, client_app, 2, AppConfig.from_run_config({**values, "run-dir": str(tmp_path / "sim")})
             .to_run_config(), start_trainers=start_trainers)
    for k in (0, 1):
        got = load_transform_net(tmp_path / "run" / f"user-{k}" / "final.pt")[0].state_dict()
        ref = load_transform_net(tmp_path / "sim" / f"user-{k}" / "final.pt")[0].state_dict()
        assert max((got[n].double() - v.double()).abs().max().item() for n, v in ref.items()) < 1e-6, k


def test_every_readme_run_config_example_parses_with_flowers_own_parser():
    """One grammar: each --run-config text in README.md and docs/ is what `flwr run . --run-config` accepts, and
    names only keys the app knows."""
    import re
    from pathlib import Path

    from flwr.common.config import parse_config_args

    root = Path(__file__).resolve().parents[1]
    found = 0
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text().replace("\\\n", " ")
        for _quote, body in re.findall(r"--run-config\s+(['\"])(.*?)\1", text, flags=re.S):
            values = parse_config_args([" ".join(body.split())])
            assert values, (doc.name, body)
            AppConfig.from_run_config({k: v for k, v in values.items()})
            found += 1
    assert found >= 5, found


def test_run_config_text_needs_quoted_strings_and_gets_a_clear_error():
    from pp_flower.config import parse_run_config
    from pp_flower.errors import PPFlowerError

    assert parse_run_config('classifier="runs/c/best.pt" alpha=0.005 augment=false') == {
        "classifier": "runs/c/best.pt", "alpha": 0.005, "augment": False}
    with pytest.raises(PPFlowerError, match='Strings must be quoted'):
        parse_run_config("classifier=runs/c/best.pt")


@pytest.mark.parametrize("key, value, says", [
    ("alpha", -1, "'alpha' must be ≥ 0"), ("unet-base", 3, "'unet-base' must be ≥ 4"),
    ("augment", "maybe", "'augment' must be true or false"), ("lr", -5, "'lr' must be > 0"),
    ("epochs", 0, "'epochs' must be ≥ 1"), ("epochs", 1.5, "'epochs' must be a whole number"),
    ("user-device", "gpu", "'user-device' must be auto, cpu, cuda, cuda:N or mps"),
    ("keep-graph", "sometimes", "keep-graph must be 'auto', 'keep' or 'recompute'"),
])
def test_out_of_range_run_config_is_one_clear_line(key, value, says):
    from pp_flower.errors import PPFlowerError

    with pytest.raises(PPFlowerError, match=says):
        AppConfig.from_run_config({key: value})


def test_zero_users_is_refused_at_once(tmp_path):
    proc = _flower_simulation("--num-supernodes", "0", "--run-config", f'run-dir="{tmp_path}/r"', timeout=120)
    assert proc.returncode == 2 and "--num-supernodes must be at least 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_more_users_than_memory_is_refused_at_once_before_ray(tmp_path, classifier_ckpt):
    """Issue #24: a simulation whose users cannot fit fails at once with one line saying what it would need."""
    rc = format_run_config({**TINY, "unet-base": 64, "classifier": str(classifier_ckpt),
                            "run-dir": str(tmp_path / "r")})
    proc = _flower_simulation("--num-supernodes", "100000", "--num-cpus", "0.01", "--run-config", rc, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "100000 users need about" in proc.stderr and "at most" in proc.stderr and "users fit here" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
