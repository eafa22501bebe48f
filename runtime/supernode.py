"""``ppflower-supernode``: Flower's ``flower-supernode`` with shorter polling, for a user's machine.

Flower 1.42's SuperNode sleeps 3 s whenever its pull finds no message and polls for the ClientApp's reply
every 0.5 s; its SuperExec looks for new ClientApp tasks every second. In split learning the provider sends
the next step's message a few milliseconds after the user's reply arrives, so nearly every step pays the
3 s sleep. Polling faster is no answer on a small machine: each pull is a TLS request that costs the SuperLink
CPU. This wrapper keeps every argument and behaviour of ``flower-supernode`` and replaces those waits: the
idle pull learns the usual gap between our reply and the provider's next message, sleeps through most of it,
then polls at 20 ms growing to ``PPFLOWER_SUPERNODE_POLL`` = 0.5 s; the reply poll is 0.01 s; the SuperExec
is woken through a private FIFO when a message is stored, instead of polling every second. It sends its
heartbeat every 10 s instead of 30 s (a killed node is seen offline, and may come back, after 20 s instead of
60 s). Its SuperExec is ``runtime.superexec``, which forks each message's ClientApp process from a template that
imported torch and flwr once, instead of starting a fresh interpreter per message (``PPFLOWER_WARM_CLIENTAPP=0``
turns that off).

It also starts the user's long-lived trainer beside the SuperNode (``python -m sims.trainer``: the app's module,
started by name, :data:`TRAINER_MODULE`, as Flower starts apps): one process holding h_θ, its optimizer, φ and the
images, which each message's ClientApp process only relays to, over an owner-only Unix socket
authenticated by a secret that only this SuperNode's processes know (a fresh 0700 directory holds both). The
trainer is restarted when it dies or hangs (``PPFLOWER_TRAINER_HANG_TIMEOUT`` s in one call); the user then resumes
from its resume point. ``PPFLOWER_USER_TRAINER=0`` runs without it (state in ``context.state``, as plain
``flower-supernode`` does).

It patches module internals of the pinned flwr 1.42.x (all in runtime/flower_patches.py); plain
``flower-supernode`` works with the app too, only slower (docs/deployment.md).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time as _time

TRAINER_MODULE = "sims.trainer"  # the app's trainer process, run by name (``python -m``) as Flower runs apps

class TrainerSupervisor:
    """Starts the user's trainer (``python -m`` :data:`TRAINER_MODULE`) and keeps it alive: restarted when it exits or
    stops answering pings."""

    def __init__(self, hang_timeout: float | None = None, check_every: float = 1.0):
        from pp_flower.channel import make_secret

        self.dir = tempfile.mkdtemp(prefix="ppf-")  # 0700: this node's user only (short: socket paths ≤ 107 bytes)
        self.socket = os.path.join(self.dir, "trainer.sock")
        self.secret_file = os.path.join(self.dir, "secret")
        self.secret = make_secret(self.secret_file)
        self.hang_timeout = float(os.environ.get("PPFLOWER_TRAINER_HANG_TIMEOUT", "300")) if hang_timeout is None \
            else hang_timeout
        self.check_every = check_every
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.stopped = threading.Event()

    def start(self) -> None:
        env = {**os.environ, "PPFLOWER_TRAINER_HANG_TIMEOUT": str(self.hang_timeout)}
        self.proc = subprocess.Popen([sys.executable, "-m", TRAINER_MODULE, "--socket", self.socket,
                                      "--secret-file", self.secret_file], env=env)
        deadline = _time.time() + 120
        while not os.path.exists(self.socket) and self.proc.poll() is None and _time.time() < deadline:
            _time.sleep(0.02)

    def _responsive(self) -> bool:
        from pp_flower.channel import TrainerClient

        try:
            TrainerClient(self.socket, self.secret, self.hang_timeout + 10).request("ping")
            return True
        except Exception:  # noqa: BLE001 - any failure to answer is a hang or a death
            return False

    def watch(self) -> None:
        while not self.stopped.wait(self.check_every):
            dead = self.proc.poll() is not None
            if not dead and not self._responsive() and not self.stopped.is_set():
                print("ppflower-supernode: the user's trainer hangs; restarting it", file=sys.stderr, flush=True)
                self.proc.kill()
                self.proc.wait()
                dead = True
            if dead and not self.stopped.is_set():
                self.restarts += 1
                print(f"ppflower-supernode: the user's trainer exited ({self.proc.returncode}); restarting it "
                      "(the user resumes from its resume point)", file=sys.stderr, flush=True)
                if os.path.exists(self.socket):
                    os.unlink(self.socket)
                self.start()

    def stop(self) -> None:
        self.stopped.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_user_trainer() -> TrainerSupervisor:
    """The user's trainer, supervised; this SuperNode's ClientApp processes find it through their environment."""
    supervisor = TrainerSupervisor()
    supervisor.start()
    os.environ["PPFLOWER_TRAINER_SOCKET"] = supervisor.socket
    os.environ["PPFLOWER_TRAINER_SECRET"] = supervisor.secret_file
    atexit.register(supervisor.stop)
    threading.Thread(target=supervisor.watch, daemon=True).start()
    return supervisor


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    from runtime.flower_patches import (install_fast_object_pulls, install_fast_polling, make_superexec_waker,
                                        plain_logs_when_piped, use_superexec)

    plain_logs_when_piped()
    private = tempfile.mkdtemp(prefix="ppf-node-")  # 0700: the SuperExec's wake-up FIFO
    atexit.register(shutil.rmtree, private, True)
    fifo, wake = make_superexec_waker(private)
    os.environ["PPFLOWER_SUPEREXEC_WAKE"] = fifo  # read by runtime.superexec, which the SuperNode starts
    install_fast_polling(wake=wake)
    install_fast_object_pulls()
    if os.environ.get("PPFLOWER_USER_TRAINER", "1") != "0":
        start_user_trainer()
    use_superexec()
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
