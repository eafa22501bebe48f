"""Issue 23, kinds 11–13: what Ray cannot give, what the users must see as the launcher does, signals and
concurrent runs. Each test runs the failing input (or a smaller one) and asserts the right behaviour."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from pp_flower.config import format_run_config
from tests.conftest import processes_with
from tests.test_flower_app import TINY

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(condition, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# ----------------------------------------------------------------------------- kind 11: Ray asked for too much

def _cores() -> int:
    return len(os.sched_getaffinity(0))


RAY_REFUSALS = {
    "more-cpus-than-the-machine": (lambda tmp: (["--num-cpus", str(2 * _cores())], {}), "--num-cpus"),
    "unreachable-RAY_ADDRESS": (lambda tmp: ([], {"RAY_ADDRESS": f"127.0.0.1:{_free_port()}"}), "127.0.0.1:"),
    "auto-without-a-cluster": (lambda tmp: (["--ray-address", "auto"], {"RAY_TMPDIR": str(tmp)}), "auto"),
    "not-an-address": (lambda tmp: (["--ray-address", "garbage"], {}), "garbage"),
    "negative-cpus": (lambda tmp: (["--num-cpus", "-1"], {}), "--num-cpus"),
    "gpus-on-a-cpu-box": (lambda tmp: (["--num-gpus", "1"], {}), "--num-gpus"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(RAY_REFUSALS))
def test_simulation_refuses_what_ray_cannot_give_in_seconds(tmp_path, classifier_ckpt, case):
    """Kind 11: resources beyond the machine, an unreachable/invalid Ray address: one line, exit 2, in seconds
    (was: "ActorPool is empty" then a 10-minute hang; minutes of retries; a raw ConnectionError)."""
    if case == "gpus-on-a-cpu-box":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    make, expected = RAY_REFUSALS[case]
    ray_tmp = tmp_path / "ray-empty"
    ray_tmp.mkdir()
    args, extra_env = make(ray_tmp)
    env = _env(**extra_env)
    if "RAY_ADDRESS" not in extra_env:
        env.pop("RAY_ADDRESS", None)
    rc = format_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": str(tmp_path / "run")})
    argv = [sys.executable, "-m", "runtime.flower_simulation", "--num-supernodes", "2", *args, "--run-config", rc]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                            start_new_session=True)
    try:  # generous for a loaded machine: the refusal comes before any data, ψ or (but for GPUs) Ray is loaded
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{case}: still running after 300 s")
    assert proc.returncode == 2, (proc.returncode, err[-3000:])
    assert expected in _one_error_line(err)
    if case != "gpus-on-a-cpu-box":
        assert "Started a local Ray instance" not in err  # refused before Ray was started or attached


@pytest.mark.slow
def test_server_app_stops_at_once_when_the_simulation_engine_dies(tmp_path, classifier_ckpt):
    """Kind 11: the engine dies (here: no actor fits the resources asked for) → the ServerApp thread ends in
    seconds instead of waiting out its setup timeout (600 s) in a process that cannot exit."""
    from pp_flower.config import AppConfig
    from runtime.flower_patches import install_event_driven_dispatch, run_simulation_engine
    from runtime.flower_simulation import start_ray
    from sims.main import client_app, server_app
    from flwr.app import Context, RecordDict

    install_event_driven_dispatch()
    start_ray()
    config = AppConfig.from_run_config({**TINY, "classifier": str(classifier_ckpt),
                                        "run-dir": str(tmp_path / "run")}).to_run_config()
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError):  # flwr wraps the engine's "ActorPool is empty" ValueError in RuntimeError
        run_simulation_engine(server_app, client_app, 2, {"client_resources": {"num_cpus": 10_000, "num_gpus": 0.0}},
                              context)
    _wait_for(lambda: not [t for t in set(threading.enumerate()) - before if not t.daemon and t.is_alive()], 120,
              "the ServerApp thread to end")


# --------------------------------------------------------------- kind 12: users see what the launcher sees

def _tiny_image_folder(root: Path, per_class: int = 3, classes=("a", "b")) -> Path:
    from PIL import Image

    for part in ("train", "test"):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(root / part / c / f"{i}.png")
    return root


def test_driver_resolves_paths_and_sends_the_data_it_sees(tmp_path, monkeypatch, classifier_ckpt, data_dir,
                                                          vgg_weights):
    """Kind 12: relative paths become the caller's absolute ones, and an empty data-dir/vgg-weights becomes what
    the driver's environment names, so users (on any machine of a Ray cluster) see the same files."""
    import shutil

    from sims.main import prepare_run_config

    shutil.copy(classifier_ckpt, tmp_path / "psi.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PPFLOWER_DATA_DIR", os.path.relpath(data_dir, tmp_path))
    config = prepare_run_config({**TINY, "classifier": "psi.pt", "run-dir": "out/run"})
    assert config["classifier"] == str(tmp_path / "psi.pt")
    assert config["run-dir"] == str(tmp_path / "out" / "run")
    assert config["data-dir"] == str(Path(data_dir).resolve())
    assert config["vgg-weights"] == str(Path(vgg_weights).resolve())


def test_user_refuses_a_data_set_other_than_the_providers(tmp_path, classifier_ckpt, data_dir):
    """Kind 12: the provider sends a fingerprint of its data set (file names and counts, no labels) with the setup;
    a user whose data-dir holds another set refuses with one line instead of indexing the wrong images."""
    from pp_flower.config import AppConfig
    from pp_flower.errors import PPFlowerError
    from pp_flower.user import UserTrainer
    from strategies.provider import ProviderStrategy, UserTrack

    cfg = AppConfig.from_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": str(tmp_path / "run"),
                                     "data-dir": data_dir})
    provider = ProviderStrategy.from_config(cfg)
    provider.steps_per_epoch = 3
    ids = {"train": provider.ids["train"][:48], "val": provider.ids["val"], "test": provider.ids["test"]}
    meta = provider.setup_config(UserTrack(1, 0, ids))
    meta.pop("resume")  # (the ClientApp takes it out, sims.main.setup)
    arrays = {k: v.numpy() for k, v in ids.items()}
    text = json.dumps(meta)
    assert "label" not in text
    UserTrainer().setup("k0", dict(meta), arrays)  # the same data set: accepted
    other = _tiny_image_folder(tmp_path / "other")
    with pytest.raises(PPFlowerError) as refused:
        UserTrainer().setup("k1", {**meta, "data-dir": str(other)}, arrays)
    message = str(refused.value)
    assert "\n" not in message and "data set" in message and str(other) in message


def test_a_trainer_loads_a_runs_data_set_once_for_all_its_users(tmp_path, classifier_ckpt, data_dir, monkeypatch):
    """Users of one run set up on one trainer share its images (each lookup stats every file); another run's
    user loads them afresh."""
    import pp_flower.user as user_module
    from pp_flower.config import AppConfig
    from pp_flower.user import UserTrainer
    from strategies.provider import ProviderStrategy, UserTrack

    cfg = AppConfig.from_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": str(tmp_path / "run"),
                                     "data-dir": data_dir})
    provider = ProviderStrategy.from_config(cfg)
    provider.steps_per_epoch = 3
    loads = []
    real = user_module.load_datasets
    monkeypatch.setattr(user_module, "load_datasets", lambda *a: loads.append(a) or real(*a))
    trainer = UserTrainer()
    for i in range(3):
        ids = {"train": provider.ids["train"][16 * i:16 * (i + 1)], "val": provider.ids["val"],
               "test": provider.ids["test"]}
        meta = provider.setup_config(UserTrack(i, i, ids))
        meta.pop("resume")
        trainer.setup(f"k{i}", meta, {k: v.numpy() for k, v in ids.items()})
    assert len(loads) == 1
    assert trainer.users["k2"].images("train")[0] is trainer.users["k0"].images("train")[0]
    trainer.setup("other", {**meta, "run-dir": str(tmp_path / "run2")}, {k: v.numpy() for k, v in ids.items()})
    assert len(loads) == 2


def test_data_fingerprint_is_computed_once_per_listing_and_follows_renames(tmp_path):
    """Every user's setup asks for the fingerprint (1,000 times with 1,000 users): a repeat costs a few stat calls,
    and a file added, removed or renamed since still gives the new set's fingerprint."""
    import os

    from pp_flower.data import index_fingerprint

    root = _tiny_image_folder(tmp_path / "set")
    first = index_fingerprint(root)
    assert index_fingerprint(root) == first
    os.rename(root / "train" / "a" / "0.png", root / "train" / "a" / "9.png")
    renamed = index_fingerprint(root)
    assert renamed != first and renamed.startswith("train:6:")
    (root / "test" / "b" / "0.png").unlink()
    removed = index_fingerprint(root)
    assert removed != renamed and " test:5:" in removed


# ------------------------------------------------------------------- kind 13: signals and concurrent runs

def _train_classifier(out: Path, epochs: int = 200) -> list[str]:
    return [sys.executable, "-m", "cli.ppflower", "train-classifier", "--epochs", str(epochs), "--limit-train", "256",
            "--limit-eval", "64", "--batch-size", "32", "--checkpoint-every", "1", "--out", str(out)]


def _default_signals() -> None:
    """In the child: SIGINT and SIGHUP as a terminal's command gets them, however pytest was started (nohup, &)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _start(argv, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True, preexec_fn=_default_signals, **kwargs)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its whole group: children it failed to stop included
    except ProcessLookupError:
        pass
    proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("signals", [(signal.SIGINT,), (signal.SIGTERM,), (signal.SIGHUP,),
                                     (signal.SIGINT, signal.SIGINT)], ids=["int", "term", "hup", "int-twice"])
def test_every_interrupt_prints_its_resume_line(tmp_path, signals):
    """Kind 13: Ctrl-C (typer used to swallow it: exit 130 without a word), SIGTERM and SIGHUP (were fatal, no
    line) on a long command: exit 130 and one "rerun to resume" line; a second signal does not cut it short."""
    out = tmp_path / "psi"
    proc = _start(_train_classifier(out), env=_env())
    try:
        _wait_for(lambda: (out / "last.pt").exists() or proc.poll() is not None, 900, "the first resume point")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        for sig in signals:
            proc.send_signal(sig)
            time.sleep(0.05) if len(signals) > 1 else None
        _, err = proc.communicate(timeout=300)
    finally:
        _stop(proc)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert err.count("rerun the same command to resume") == 1 and "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_a_second_run_into_a_busy_out_dir_is_refused_and_a_dead_runs_lock_does_not_block(tmp_path):
    """Kind 13: two train-classifier runs into one --out (both used to write last.pt); the first killed with
    SIGKILL leaves its lock file behind, which must not block the next run."""
    out = tmp_path / "psi"
    first = _start(_train_classifier(out), env=_env())
    try:
        _wait_for(lambda: (out / "last.pt").exists() or first.poll() is not None, 900, "the first run's checkpoint")
        second = subprocess.run(_train_classifier(out), capture_output=True, text=True, cwd=ROOT, env=_env(),
                                timeout=600)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "in use" in _one_error_line(second.stderr)
        assert first.poll() is None
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        third = _start(_train_classifier(out), env=_env())
        try:
            stamp = (out / "last.pt").stat().st_mtime_ns
            _wait_for(lambda: third.poll() is not None or (out / "last.pt").stat().st_mtime_ns != stamp, 900,
                      "the third run to resume and write a checkpoint")
            assert third.poll() is None, third.communicate()[1][-3000:]
        finally:
            _stop(third)
    finally:
        _stop(first)


@pytest.mark.slow
def test_a_second_simulation_on_one_run_dir_is_refused(tmp_path, classifier_ckpt):
    """Kind 13: two flower-simulation runs on one run dir used to both exit 0, run A reporting run B's numbers."""
    run_dir = tmp_path / "run"
    rc = format_run_config({**TINY, "classifier": str(classifier_ckpt), "run-dir": str(run_dir), "epochs": 30})
    argv = [sys.executable, "-m", "runtime.flower_simulation", "--num-supernodes", "1", "--run-config", rc]
    marker = f"PPF_TEST_{uuid.uuid4().hex}"
    first = _start(argv, env=_env(**{marker: "1"}))
    try:
        _wait_for(lambda: (run_dir / "user-0").exists() or first.poll() is not None, 900, "the first run's users")
        assert first.poll() is None, first.communicate()[1][-3000:]
        second = _start(argv, env=_env(**{marker: "1"}))
        try:
            _, err = second.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail("the second run on the same run dir was not refused within 600 s")
        finally:
            _stop(second)
        assert second.returncode == 2 and "in use" in _one_error_line(err), err[-3000:]
        assert "Started a local Ray instance" not in err  # refused before its Ray, let alone its users, started
        assert first.poll() is None
        os.killpg(first.pid, signal.SIGINT)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 130, err[-3000:]
    finally:
        _stop(first)
    _wait_for(lambda: not processes_with(marker), 60, "every process of both runs to exit")


REPRODUCE_DRIVER = """
import sys
from pathlib import Path
import experiments.reproduce as r
psi = Path(sys.argv[1]).parent
r.Reproduction.classifier = lambda self, arch, baseline="", transform="", role="psi": psi  # ψ done: skip to h_θ
sys.argv = ["ppflower", "reproduce", "--preset", "smoke", "--out", sys.argv[2], "--workdir", sys.argv[3]]
from cli.ppflower import main
main()
"""


@pytest.mark.slow
def test_sigterm_to_reproduce_stops_its_simulation_and_says_interrupted(tmp_path, classifier_ckpt):
    """Kind 13: SIGTERM to `ppflower reproduce` left its child flower-simulation running as an orphan."""
    marker = f"PPF_TEST_{uuid.uuid4().hex}"
    proc = _start([sys.executable, "-c", REPRODUCE_DRIVER, str(classifier_ckpt), str(tmp_path / "out"),
                   str(tmp_path / "work")], env=_env(**{marker: "1"}))
    child = []

    def simulating() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"reproduce ended early: {proc.communicate()[1][-3000:]}")
        simulations = [c for c in _children(proc.pid)
                       if b"runtime.flower_simulation" in Path(f"/proc/{c}/cmdline").read_bytes()]
        if simulations and list((tmp_path / "work").glob("transform-*/user-0")):
            child[:] = simulations
            return True
        return False

    try:
        _wait_for(simulating, 900, "the α stage's simulation to start training", poll=0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, err[-3000:]
        assert err.count("interrupted") == 1 and "failed (exit" not in err and "Traceback" not in err, err[-3000:]
        _wait_for(lambda: not any(_alive(c) for c in child), 120, "the child simulation to exit")
        _wait_for(lambda: not processes_with(marker), 60, "every process of the run (Ray's included) to exit")
    finally:
        _stop(proc)
        for c in child:
            if _alive(c):
                os.kill(c, signal.SIGKILL)
