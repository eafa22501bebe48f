"""The provider strategy against real ClientApp handlers on an in-process grid (no Ray): lost messages."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, Message, RecordDict

from pp_flower.checkpoints import load_transform_net
from pp_flower.config import AppConfig
from strategies.provider import ProviderStrategy


class LocalGrid:
    """Delivers each message to the real ClientApp at once; ``lose`` decides which messages vanish unprocessed."""

    def __init__(self, client_app, num_nodes: int, lose=lambda node, msg: False, node_config=None):
        node_config = node_config or {"user-trainer": "in-process"}
        self.app, self.lose = client_app, lose
        self.contexts = {n: Context(run_id=1, node_id=n, node_config=dict(node_config), state=RecordDict(),
                                    run_config={})
                         for n in range(1, num_nodes + 1)}
        self.replies: dict[str, Message] = {}
        self.lost = 0

    def get_node_ids(self):
        return list(self.contexts)

    def get_nodes(self):
        return [SimpleNamespace(node_id=n, last_activated_at="") for n in self.contexts]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if self.lose(node, msg):
                self.lost += 1
                continue
            reply = self.app(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            self.replies[mid] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]


def _run(tmp_path, classifier_ckpt, name, lose=lambda node, msg: False, mode="in-process"):
    from sims.main import client_app

    cfg = AppConfig.from_run_config({"limit-train": 64, "batch-size": 16, "unet-base": 4, "unet-depth": 2,
                                     "limit-eval": 10, "eval-chunk": 10, "num-threads": 1, "step-timeout": 0.3,
                                     "classifier": str(classifier_ckpt), "run-dir": str(tmp_path / name)})
    grid = LocalGrid(client_app, 2, lose, {"user-trainer": mode})
    result = ProviderStrategy.from_config(cfg).start(grid)
    return json.loads((tmp_path / name / "run.json").read_text()), grid, result


@pytest.fixture
def task_identity():
    """Flower's Message() needs a run/task identity, which its runtimes normally set."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    keys = [k for k in ("_run_id", "_task_id", "_node_id") if hasattr(TaskIdentity, k)]
    saved = {k: getattr(TaskIdentity, k) for k in keys}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    for key, value in saved.items():
        setattr(TaskIdentity, key, value)


@pytest.mark.parametrize("mode", ["in-process", "context"])  # a live trainer; state in context.state (plain SuperNode)
def test_lost_message_drops_the_user_for_one_step_and_changes_nothing(tmp_path, classifier_ckpt, task_identity, mode):
    state = {"done": False}

    def lose_once(node, msg):  # the message carrying user 2's gradient for step 0 never arrives
        control = msg.content.config_records.get("control") if msg.has_content() else None
        if node == 2 and msg.metadata.message_type == "train.step" and control and control["grad-step"] == 0 \
                and not state["done"]:
            state["done"] = True
            return True
        return False

    clean, _, _ = _run(tmp_path, classifier_ckpt, "clean", mode=mode)
    faulty, grid, _ = _run(tmp_path, classifier_ckpt, "faulty", lose_once, mode=mode)
    assert grid.lost == 1
    user = faulty["users"][1]
    assert [reason for _, reason in user["dropped-steps"]] == ["no reply within 0.3 s"]
    assert user["active"] and user["steps-applied"] == clean["users"][1]["steps-applied"] == 2
    # the user rejoined from its own state: same weights as in the run without the lost message
    a, _ = load_transform_net(tmp_path / "clean" / "user-1" / "final.pt")
    b, _ = load_transform_net(tmp_path / "faulty" / "user-1" / "final.pt")
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert json.loads((tmp_path / "faulty" / "run.json").read_text())["users"][0]["dropped-steps"] == []


def test_provider_is_a_flower_strategy_returning_flowers_result(tmp_path, classifier_ckpt, task_identity):
    """ProviderStrategy is a flwr Strategy; start() returns a Result with each round's per-user metrics."""
    import flwr.serverapp.strategy as flwr_strategy

    assert issubclass(ProviderStrategy, flwr_strategy.Strategy)
    summary, _, result = _run(tmp_path, classifier_ckpt, "run")
    assert isinstance(result, flwr_strategy.Result)
    steps = summary["steps-per-epoch"]
    # one training round per SGD step of the users, each with every user's L_class of that step, as in run.json
    assert sorted(result.train_metrics_clientapp) == list(range(1, steps + 1))
    for k, user in enumerate(summary["users"]):
        losses = [result.train_metrics_clientapp[r][f"user-{k}/train-class-loss"] for r in range(1, steps + 1)]
        assert losses == pytest.approx(user["train-class-loss-curve"])
    # validation after the epoch, then the test: the users' own metrics, keyed by user
    (val_round, val), (test_round, test) = sorted(result.evaluate_metrics_clientapp.items())
    assert (val_round, test_round) == (steps + 1, steps + 2)  # the last training round only applies gradients
    for k, user in enumerate(summary["users"]):
        assert val[f"user-{k}/val-transform-loss"] == pytest.approx(user["val"][0]["val-transform-loss"])
        assert test[f"user-{k}/test-accuracy"] == pytest.approx(user["test"]["test-accuracy"])
        assert test[f"user-{k}/protected-psnr"] == pytest.approx(user["test"]["protected-psnr"])


def test_one_round_reads_in_one_method_and_state_lives_in_init():
    """The provider a newcomer opens first (issue #27): one SGD round is one short method calling Flower's hooks in
    order, and every attribute the strategy ever assigns is declared in ``__init__`` (no state between hooks)."""
    import ast
    import inspect
    import textwrap

    source = inspect.getsource(ProviderStrategy._train_round)
    assert len(source.splitlines()) < 40
    calls = [n.func.attr for n in ast.walk(ast.parse(textwrap.dedent(source)))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    hooks = [c for c in calls if c in ("reconnect", "configure_train", "exchange", "aggregate_train")]
    assert hooks == ["reconnect", "configure_train", "exchange", "aggregate_train"]

    tree = ast.parse(textwrap.dedent(inspect.getsource(ProviderStrategy)))
    declared, assigned = set(), {}
    for method in (n for n in tree.body[0].body if isinstance(n, ast.FunctionDef)):
        for node in ast.walk(method):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else \
                [i.optional_vars for i in node.items if i.optional_vars is not None] \
                if isinstance(node, ast.With) else []
            for t in targets:
                for leaf in ast.walk(t):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                        (declared.add(leaf.attr) if method.name == "__init__"
                         else assigned.setdefault(leaf.attr, method.name))
    assert {a: m for a, m in assigned.items() if a not in declared} == {}
    assert len(assigned) > 3  # the check sees assignments outside __init__ (e.g. self.bar in start)


def test_grad_noise_scales_with_each_gradient(tmp_path, classifier_ckpt):
    """The grad-noise defence adds N(0, σ²) with σ = grad-noise·‖g‖/√d per image; 0 returns g untouched."""
    provider = ProviderStrategy(AppConfig(**{"grad_noise": 0.5}), torch.nn.Linear(1, 1),
                                torch.zeros(4, dtype=torch.long),
                                {"train": torch.arange(4), "val": torch.arange(0), "test": torch.arange(0)})
    g = torch.randn(64, 3, 32, 32) * torch.logspace(-3, 1, 64).view(64, 1, 1, 1)
    noisy = provider._perturb(g)
    ratio = (noisy - g).flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5), rtol=0.05)  # ‖noise‖ ≈ 0.5·‖g‖ for every image
    provider.cfg = AppConfig()
    assert provider._perturb(g) is g


def test_a_rerun_keeps_the_earlier_runs_summary_instead_of_overwriting_it(tmp_path, classifier_ckpt, task_identity):
    first, _, _ = _run(tmp_path, classifier_ckpt, "run")
    assert first["earlier-runs"] == [] and first["rounds"] and first["users"][0]["train-class-loss-curve"]
    again, _, _ = _run(tmp_path, classifier_ckpt, "run")  # a finished run, rerun: it resumes and trains nothing
    assert again["rounds"] == [] and again["users"][0]["train-class-loss-curve"] == []
    assert again["earlier-runs"] == [{k: v for k, v in first.items() if k != "earlier-runs"}]
    assert again["users"][0]["test"]["test-accuracy"] == pytest.approx(first["users"][0]["test"]["test-accuracy"])


@pytest.mark.parametrize("chain", ["abc", {"a": 1}, None, 5])
def test_an_odd_earlier_runs_entry_is_kept_as_it_was(tmp_path, chain):
    from strategies.provider import write_run_summary

    path = tmp_path / "run.json"
    before = {"rounds": [1], "earlier-runs": chain}
    path.write_text(json.dumps(before))
    write_run_summary(path, {"rounds": [2]})
    assert json.loads(path.read_text()) == {"rounds": [2], "earlier-runs": [before]}


def test_a_run_summary_that_cannot_be_written_is_one_error_and_leaves_nothing_behind(tmp_path):
    from pp_flower.errors import PPFlowerError
    from strategies.provider import write_run_summary

    (tmp_path / "run-dir").write_text("a file where the run dir should be")
    with pytest.raises(PPFlowerError, match="cannot write the run summary"):
        write_run_summary(tmp_path / "run-dir" / "run.json", {"rounds": [1]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-dir"]


def test_an_unreadable_earlier_run_json_is_kept_aside(tmp_path):
    from strategies.provider import write_run_summary

    path = tmp_path / "run.json"
    path.write_text('{"rounds": [')  # cut short by a full disk, say
    write_run_summary(path, {"rounds": [1]})
    write_run_summary(path, {"rounds": [2]})
    assert (tmp_path / "run.json.unreadable-1").read_text() == '{"rounds": ['
    assert json.loads(path.read_text()) == {"rounds": [2], "earlier-runs": [{"rounds": [1]}]}
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"  # valid JSON, but deeper than Python's decoder goes
    path.write_text(deep)
    write_run_summary(path, {"rounds": [3]})
    assert (tmp_path / "run.json.unreadable-2").read_text() == deep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.json.unreadable-1", "run.json.unreadable-2"]
