"""bench_deployment.py --trace: the timeline its processes write and the legs it splits a round into (fast)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_deployment", ROOT / "benchmarks" / "bench_deployment.py")
bench = sys.modules["bench_deployment"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _round(start: float, slow_compute: float) -> list[str]:
    """One round of two users as the processes log it; node 2 computes longer and is the critical one."""
    lines = [(0.0, "-", "provider.push+"), (0.08, "-", "provider.push-")]
    for node, compute in (("1", 0.5), ("2", slow_compute)):
        lines += [(0.10, node, "node.pull-"), (0.12, node, "clientapp.main+"), (0.19, node, "clientapp.pull-"),
                  (0.21, node, "trainer.call+"), (0.21 + compute, node, "trainer.call-"),
                  (0.25 + compute, node, "clientapp.push-"), (0.31 + compute, node, "node.push-")]
        lines += [(0.34 + compute, "-", "provider.pull-")]
    return [f"{start + t:.6f} {node} {ev}" for t, node, ev in lines]


def test_a_round_is_split_along_the_users_path_whose_reply_came_last(tmp_path):
    trace = tmp_path / "trace.txt"
    lines = []
    for k in range(6):  # 5 training rounds, each 1.2 s long; the next round's push ends the last
        lines += _round(10.0 + 1.2 * k, 0.7)
    lines.append(f"{10.0 + 1.2 * 6:.6f} - provider.push+")
    for k in range(6):  # each round: 3 object pulls of 8 ms and one push of 12 ms; the SuperLink's part 0.3 ms
        lines += [f"{10.5 + 1.2 * k + 0.01 * j:.6f} 1 request PullObject 0.008" for j in range(3)]
        lines += [f"{10.6 + 1.2 * k:.6f} - request PushMessages 0.012", f"{10.6 + 1.2 * k:.6f} - handler "
                  "fleet.pull_object 0.0003"]
    trace.write_text("\n".join(reversed(lines)) + "\n")  # processes append in any order
    result = bench.round_legs(trace, train_rounds=5)
    assert result["requests_per_round"] == {"PullObject": 3, "PushMessages": 1}
    assert result["request_median_seconds"] == pytest.approx({"PullObject": 0.008, "PushMessages": 0.012})
    assert result["superlink_handler_median_seconds"] == pytest.approx({"fleet.pull_object": 0.0003})
    legs = result["legs_median_seconds"]
    assert result["rounds"] == 5 - bench.WARMUP
    assert legs["message reaches the node"] == pytest.approx(0.10)
    assert legs["ClientApp process starts"] == pytest.approx(0.02)
    assert legs["ClientApp pulls the message"] == pytest.approx(0.07)
    assert legs["user compute (trainer)"] == pytest.approx(0.7)  # the slower user's, not the faster one's
    assert legs["provider pulls the reply"] == pytest.approx(0.03)
    assert legs["psi and bookkeeping"] == pytest.approx(1.2 - 1.04)
    assert sum(legs.values()) == pytest.approx(result["round_median_seconds"]) == pytest.approx(1.2)


def test_a_timeline_without_a_whole_round_refuses_to_report(tmp_path):
    trace = tmp_path / "trace.txt"
    trace.write_text("\n".join(_round(10.0, 0.7)[:-3]) + "\n")  # node 2's reply never reached the provider
    with pytest.raises(SystemExit):
        bench.round_legs(trace, train_rounds=5)


def test_the_processes_write_the_timeline_only_when_asked(tmp_path):
    code = ("import pp_flower.user as u\n"  # a module with a traced call, imported after start-up as in a trainer
            "trainer = u.UserTrainer.__new__(u.UserTrainer)\n"
            "for _ in range(2):\n"
            "    try:\n        u.UserTrainer.call(trainer, 'no-such-user', 0, 'step', {})\n"
            "    except Exception:\n        pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks" / "round_trace"), str(ROOT)])}
    trace = tmp_path / "trace.txt"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT)
    assert not trace.exists()
    subprocess.run([sys.executable, "-c", code], env={**env, "PPF_TRACE": str(trace)}, check=True, cwd=ROOT)
    events = [line.split()[2] for line in trace.read_text().splitlines()]
    assert events == ["trainer.call+", "trainer.call+"]  # a call that raised handed nothing over: no "-"


def test_every_flower_request_writes_its_duration(tmp_path):
    code = ("from flwr.supercore.runtime import RuntimeHttpClient\n"
            "from flwr.proto.runtime_pb2 import PullTaskInputRequest\n"
            "c = RuntimeHttpClient.from_server_address(server_address='127.0.0.1:9', insecure=True,\n"
            "                                          root_certificates=None, interceptors=[])\n"
            "try:\n    c.PullTaskInput(PullTaskInputRequest())\n"  # nothing listens on port 9: it fails, timed
            "except Exception:\n    pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks" / "round_trace"), str(ROOT)]),
           "PPF_TRACE": str(tmp_path / "trace.txt")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT, timeout=120)
    (line,) = (tmp_path / "trace.txt").read_text().splitlines()
    _, node, kind, name, seconds = line.split()
    assert (node, kind, name) == ("-", "request", "PullTaskInput") and float(seconds) >= 0
