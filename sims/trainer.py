"""A user's long-lived trainer beside its SuperNode (deployment): ``python -m sims.trainer --socket S --secret-file F``.

``ppflower-supernode`` starts it, restarts it when it dies or hangs, and stops it with the node. It holds the
user's h_θ, optimizer, φ and images (on the user's GPU when there is one) and serves the per-message ClientApp
processes over ``pp_flower.channel`` (owner-only Unix socket, node secret). It exits when its SuperNode is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time


def _exit_with_parent() -> None:
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:  # the SuperNode died (even by SIGKILL): a trainer never outlives its node
            os._exit(0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--secret-file", required=True)
    ap.add_argument("--num-threads", type=int, default=0)
    ap.add_argument("--hang-timeout", type=float, default=float(os.environ.get("PPFLOWER_TRAINER_HANG_TIMEOUT", 300)))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer %(levelname)s %(message)s", stream=sys.stderr)
    threading.Thread(target=_exit_with_parent, daemon=True).start()

    from pp_flower.channel import TrainerServer, read_secret
    from pp_flower.user import UserTrainer

    server = TrainerServer(UserTrainer(args.num_threads), args.socket, read_secret(args.secret_file), args.hang_timeout)
    print(f"ppflower trainer: serving on {args.socket}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
