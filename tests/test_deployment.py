"""The app on Flower's Deployment Engine: SuperLink + SuperNodes as real processes on loopback, TLS and
SuperNode authentication on (runtime.deploy_local, the code behind `ppflower deploy-local`)."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request

import pytest

from runtime.deploy_local import LocalDeployment, make_node_key
from tests.test_flower_app import TINY


def _run_config(classifier_ckpt, run_dir, **overrides) -> dict:
    return {**TINY, "classifier": str(classifier_ckpt), "run-dir": str(run_dir), "min-users": 2,
            "wait-for-users": 120.0, "step-timeout": 180.0, **overrides}


@pytest.mark.slow
def test_tls_and_auth_run_completes_and_unregistered_nodes_are_refused(tmp_path, classifier_ckpt):
    run_dir = tmp_path / "provider"
    with LocalDeployment(tmp_path / "dep", users=2, secure=True) as dep:
        # TLS: the SuperLink's port speaks HTTPS with our CA's certificate, and nothing in plain HTTP
        ctx = ssl.create_default_context(cafile=str(dep.creds.ca_cert))
        with socket.create_connection(("127.0.0.1", dep.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{dep.port}/", timeout=10)

        # an intruder with a key nobody registered, and a node with no key at all
        intruder_key, _ = make_node_key(dep.workdir / "certificates", "intruder")
        dep.start_supernode(90, private_key=intruder_key, name="intruder")
        dep.start_supernode(91, name="keyless", auth=False)  # TLS but no key: signs with a throwaway key

        rc = dep.run_app(_run_config(classifier_ckpt, run_dir, **{"epochs": 1}), timeout=600)
        assert rc == 0, dep.logtext("superlink")[-3000:]
        listing = json.loads(dep.flwr(["supernode", "list", "pp-local", "--format", "json"]))
        refused = {name: (dep.processes[name].poll(), dep.logtext(name)) for name in ("intruder", "keyless")}
        superlink_log = dep.logtext("superlink")
        node_logs = [dep.logtext(f"supernode-{k}") for k in range(2)]

    run = json.loads((run_dir / "run.json").read_text())
    assert [u["steps-applied"] for u in run["users"]] == [2, 2]  # 48 images / 2 users / batch 16 = 2 steps each
    outputs = sorted((tmp_path / "dep" / "nodes").glob("supernode-*/metrics.json"))
    assert len(outputs) == 2 and sorted(json.loads(p.read_text())["user"] for p in outputs) == [0, 1]
    by_user = {json.loads(p.read_text())["user"]: json.loads(p.read_text()) for p in outputs}
    for u in run["users"]:  # what the provider reports is what each user measured on its own machine
        assert u["test"]["test-accuracy"] == pytest.approx(by_user[u["index"]]["test-accuracy"])
    assert not (tmp_path / "dep" / "nodes" / "intruder" / "metrics.json").exists()
    # both were refused: each exited with Flower's exit code 305 and says why; the SuperLink logged the refusals
    assert refused["intruder"][0] not in (None, 0)
    assert "[code: 2004] Failed to activate SuperNode" in refused["intruder"][1]
    assert refused["keyless"][0] not in (None, 0) and "All SuperNodes must be registered" in refused["keyless"][1]
    assert "ApiError:2004" in superlink_log and "ApiError:2001" in superlink_log
    assert len(listing["nodes"]) == 2, listing  # only the two registered users' nodes exist
    # ppflower-supernode forked each message's ClientApp process from its pre-imported template (runtime.superexec):
    # setup, 2 steps + the last gradient, validation and test are ≥ 6 messages per user
    assert all(log.count("started warm") >= 6 for log in node_logs), [log.count("started warm") for log in node_logs]


@pytest.mark.slow
def test_killed_supernode_is_dropped_and_rejoins_after_restart(tmp_path, classifier_ckpt):
    run_dir = tmp_path / "provider"
    config = _run_config(classifier_ckpt, run_dir, **{"limit-train": 384, "epochs": 1, "checkpoint-every": 1,
                                                      "step-timeout": 180.0, "max-failures": 1})
    with LocalDeployment(tmp_path / "dep", users=2, secure=True) as dep:
        victim_out = dep.workdir / "nodes" / "supernode-1"
        events = {}

        def kill_then_restart():
            deadline = time.time() + 400
            while not (victim_out / "resume.pt").exists() and time.time() < deadline:
                time.sleep(0.2)  # the victim has applied at least one step
            dep.kill("supernode-1", signal.SIGKILL)
            events["killed"] = time.time()
            # like a supervisor would: restart until it stays up (Flower refuses to activate a node id that is
            # still marked online, i.e. until two missed heartbeats)
            while time.time() < deadline:
                time.sleep(5)
                dep.start_supernode(1)
                time.sleep(10)
                if dep.processes["supernode-1"].poll() is None:
                    events["restarted"] = time.time()
                    return

        chaos = threading.Thread(target=kill_then_restart, daemon=True)
        chaos.start()
        rc = dep.run_app(config, timeout=900)
        chaos.join(timeout=60)
        provider_log = (dep.workdir / "flwr-run.log").read_text()
    assert rc == 0 and "killed" in events and "restarted" in events
    run = json.loads((run_dir / "run.json").read_text())
    victim = max(run["users"], key=lambda u: len(u["dropped-steps"]))
    survivor = min(run["users"], key=lambda u: len(u["dropped-steps"]))
    assert survivor["steps-applied"] == 12 and survivor["test"], survivor  # 384 / 2 / 16 = 12 steps
    assert victim["dropped-steps"], victim                                 # dropped while its node was down …
    assert victim["rejoins"] and victim["rejoins"][0][2] >= 1, victim      # … and back, from its resume point
    assert victim["steps-applied"] == 12 and victim["test"], victim        # it finished its epoch and the test
    assert "dropped from this step" in provider_log and "rejoined" in provider_log


def _trainer_pid(dep, name: str) -> int | None:
    """The pid of the user trainer (sims.trainer) that the SuperNode ``name`` started."""
    from runtime.deploy_local import descendants

    for pid in descendants(dep.processes[name].pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sims.trainer" in f.read():
                    return pid
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_killed_trainer_is_restarted_and_the_user_replays_to_a_fault_free_runs_weights(tmp_path, classifier_ckpt):
    """SIGKILL a user's trainer mid-run: its SuperNode restarts it, the user resumes from its resume point and the
    provider replays the steps after it; every user's final h_θ equals a fault-free simulation's (|Δθ| < 1e-6)."""
    import os

    from pp_flower.checkpoints import load_transform_net
    from pp_flower.config import AppConfig
    from runtime.flower_simulation import simulate
    from sims.main import client_app, server_app, start_trainers

    overrides = {"limit-train": 192, "epochs": 1, "checkpoint-every": 2, "max-failures": 20, "keep-graph": "keep"}
    config = _run_config(classifier_ckpt, tmp_path / "provider", **overrides)
    with LocalDeployment(tmp_path / "dep", users=2, secure=True) as dep:
        events = {}

        def kill_a_trainer():
            deadline = time.time() + 400
            while not list((dep.workdir / "nodes").glob("supernode-1/resume.pt")) and time.time() < deadline:
                time.sleep(0.05)
            pid = _trainer_pid(dep, "supernode-1")
            if pid:
                os.kill(pid, signal.SIGKILL)
                events["killed"] = pid

        chaos = threading.Thread(target=kill_a_trainer, daemon=True)
        chaos.start()
        rc = dep.run_app(config, timeout=900)
        chaos.join(timeout=60)
        node_log = dep.logtext("supernode-1")
        restarted = _trainer_pid(dep, "supernode-1")
    assert rc == 0 and "killed" in events
    assert "restarting it" in node_log and restarted not in (None, events["killed"])
    run = json.loads((tmp_path / "provider" / "run.json").read_text())
    assert any(u["rejoins"] for u in run["users"]), run["users"]
    assert all(u["steps-applied"] == 6 and u["active"] for u in run["users"])

    sim_config = AppConfig.from_run_config({**_run_config(classifier_ckpt, tmp_path / "sim", **overrides),
                                            "min-users": 0}).to_run_config()
    simulate(server_app, client_app, 2, sim_config, start_trainers=start_trainers)
    for path in (tmp_path / "dep" / "nodes").glob("supernode-*/final.pt"):
        got, blob = load_transform_net(path)
        index = json.loads((path.parent / "metrics.json").read_text())["user"]
        ref, _ = load_transform_net(tmp_path / "sim" / f"user-{index}" / "final.pt")
        worst = max((got.state_dict()[k].double() - v.double()).abs().max().item() for k, v in ref.state_dict().items())
        assert worst < 1e-6, (index, worst)


@pytest.mark.slow
def test_deploy_local_stops_every_process_on_ctrl_c(tmp_path, classifier_ckpt):
    """`ppflower deploy-local` interrupted while the run is going: no SuperLink/SuperNode/flwr process survives."""
    import os
    import subprocess
    import sys

    workdir = tmp_path / "dep"
    argv = [sys.executable, "-m", "cli.ppflower", "deploy-local", "--users", "2", "--workdir", str(workdir),
            "--run-config", f'classifier="{classifier_ckpt}" limit-train=48 batch-size=16 unet-base=4 unet-depth=2']
    tmp = tmp_path / "tmp"  # where every process it starts makes its temporary directories (a node's secret…)
    tmp.mkdir()
    cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.time() + 180
    while not (workdir / "flwr-run.log").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert cli.poll() is None, cli.stdout.read()
    running = []
    while len(running) < 3 and time.time() < deadline:  # the SuperLink and two SuperNodes (at least) are running
        running = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
        time.sleep(0.2)
    assert len(running) >= 3, running
    cli.send_signal(signal.SIGINT)
    out, _ = cli.communicate(timeout=60)
    assert cli.returncode == 130, out[-2000:]
    assert "\x1b[" not in out, out[-2000:]  # piped: no ANSI colour codes, the provider's streamed lines included
    assert "rerun the same command to resume" in out
    assert not list(tmp.glob("ppf-*")), list(tmp.rglob("*"))  # no trainer secret or socket directory left behind
    # deploy-local returns only once every process it started (children included) has exited: nothing to wait for
    survivors = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
    assert survivors == [], [open(f"/proc/{p}/cmdline").read() for p in survivors if os.path.exists(f"/proc/{p}")]


def test_warm_template_forks_flowers_clientapp_entry_point_with_the_given_arguments():
    """runtime.superexec's template: one forked `flwr-clientapp` per request line, Flower's own entry point, then EOF
    ends the template (the SuperExec is gone)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PPFLOWER_WARM_PRELOAD": "flwr.supernode.cli.flwr_clientapp"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.superexec", "--template"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "ready"
    proc.stdin.write('["--help"]\n')
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    err = proc.stderr.read()  # until the forked child, which shares the pipe, has exited too
    assert err.count("started warm") == 1
    assert "usage: flwr-clientapp" in err and "--runtime-api-address" in err  # the child ran flwr-clientapp --help


def test_hung_trainer_is_killed_and_restarted_by_its_supernode():
    """A trainer that stops answering (SIGSTOP: alive, but silent) is replaced; its successor answers pings."""
    import os

    from pp_flower.channel import TrainerClient
    from runtime.supernode import TrainerSupervisor

    sup = TrainerSupervisor(hang_timeout=1.0, check_every=0.2)
    sup.start()
    try:
        TrainerClient(sup.socket, sup.secret, 60).request("ping")
        hung = sup.proc
        threading.Thread(target=sup.watch, daemon=True).start()
        os.kill(hung.pid, signal.SIGSTOP)
        deadline = time.time() + 120
        while (sup.restarts == 0 or sup.proc is hung) and time.time() < deadline:
            time.sleep(0.1)
        assert sup.restarts >= 1 and sup.proc is not hung, "the hung trainer was never replaced"
        assert hung.poll() is not None  # the hung one was killed, not left behind
        while True:  # the successor answers once it listens
            try:
                TrainerClient(sup.socket, sup.secret, 60).request("ping")
                break
            except (OSError, RuntimeError):  # not listening yet
                assert time.time() < deadline, "the restarted trainer never answered"
                time.sleep(0.1)
    finally:
        sup.stop()


def test_a_run_that_writes_no_new_run_json_is_an_error_not_the_last_runs_result(tmp_path, monkeypatch):
    """deploy-local into a workdir that holds an earlier run's run.json: a run that ends without writing its own
    (flwr run exited 0 but the ServerApp failed at the end) must not hand back the earlier summary as its result."""
    from pp_flower.errors import PPFlowerError
    from runtime import deploy_local

    class FakeDeployment:  # the processes are not the point here: only what the run leaves in its run dir
        port, processes = 0, {}

        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def dead(self):
            return []

        def run_app(self, run_config, **kwargs):
            if writes:
                (run_dir / "run.json").write_text(json.dumps({"run": "this one"}))
            return 0

    monkeypatch.setattr(deploy_local, "LocalDeployment", FakeDeployment)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run": "the last one"}))
    deploy = lambda: deploy_local._deploy(2, tmp_path, run_dir, {}, True, lambda *a: None, 60, print)  # noqa: E731
    writes = False
    with pytest.raises(PPFlowerError, match="without writing"):
        deploy()
    writes = True
    assert deploy()["run"] == {"run": "this one"}
