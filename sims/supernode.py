"""``ppflower-supernode``: Flower's ``flower-supernode`` with shorter polling, for a user's machine.

Flower 1.42's SuperNode sleeps 3 s whenever its pull finds no message and polls for the ClientApp's reply
every 0.5 s; its SuperExec looks for new ClientApp tasks every second. In split learning the provider sends
the next step's message a few milliseconds after the user's reply arrives, so nearly every step pays the
3 s sleep. This wrapper keeps every argument and behaviour of ``flower-supernode`` and only shortens those
waits (idle pull 3 s → ``PPFLOWER_SUPERNODE_POLL`` = 0.05 s, reply poll 0.5 s → 0.01 s, SuperExec task poll
1 s → 0.02 s via Flower's own ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``) and sends its heartbeat every 10 s
instead of 30 s (a killed node is seen offline, and may come back, after 20 s instead of 60 s). Its SuperExec
is ``sims.superexec``, which forks each message's ClientApp process from a template that imported torch and
flwr once, instead of starting a fresh interpreter per message (``PPFLOWER_WARM_CLIENTAPP=0`` turns that off).
It patches module internals of the pinned flwr 1.42.x; plain ``flower-supernode`` works with the app too, only
slower (docs/deployment.md).
"""

from __future__ import annotations

import os
import sys
import time as _time


class _FastTime:
    """The ``time`` module as seen by flwr's SuperNode loop, with its fixed sleeps shortened."""

    def __init__(self, idle: float, reply: float):
        self._idle, self._reply = idle, reply

    def sleep(self, seconds: float) -> None:
        if seconds >= 3:
            seconds = self._idle
        elif seconds >= 0.5:
            seconds = self._reply
        _time.sleep(seconds)

    def __getattr__(self, name):
        return getattr(_time, name)


def install_fast_polling(idle: float | None = None, reply: float = 0.01, heartbeat: float | None = None) -> None:
    from flwr.supercore import heartbeat as heartbeat_module
    from flwr.supernode import fleet_http_connection, start_client_internal

    idle = float(os.environ.get("PPFLOWER_SUPERNODE_POLL", "0.05")) if idle is None else idle
    start_client_internal.time = _FastTime(idle, reply)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.02")
    # Heartbeat every 10 s (Flower's minimum; default 30 s): a dead node is marked offline after 20 s instead of
    # 60 s, and only then may a restarted node with the same key activate again.
    heartbeat = float(os.environ.get("PPFLOWER_SUPERNODE_HEARTBEAT", "10")) if heartbeat is None else heartbeat
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = heartbeat
    heartbeat_module.HEARTBEAT_DEFAULT_INTERVAL = heartbeat


def use_warm_superexec() -> None:
    """Start ``sims.superexec`` (ClientApp processes forked from a pre-imported template) as the SuperExec."""
    from flwr.supernode import start_client_internal

    from sims.superexec import route_popen

    def route(args: list[str]) -> list[str]:
        return [sys.executable, "-m", "sims.superexec", *args[1:]] if args[0] == "flower-superexec" else args

    route_popen(start_client_internal, route)


def main() -> None:
    from flwr.supernode.cli import flower_supernode

    install_fast_polling()
    if os.environ.get("PPFLOWER_WARM_CLIENTAPP", "1") != "0":
        use_warm_superexec()
    sys.argv[0] = "flower-supernode"
    sys.exit(flower_supernode())


if __name__ == "__main__":
    main()
