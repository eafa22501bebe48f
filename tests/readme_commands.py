"""The README's commands at tiny sizes: ``python -m tests.readme_commands ppflower|flower-simulation ARGS...``.

tests/test_readme.py runs every ``bash`` block of the README verbatim in a shell where ``ppflower`` and
``flower-simulation`` are this wrapper. It keeps each command and its flags as written and only shrinks
what sets the budget (epochs, image counts, widths, users), then runs the real command. The changes are
printed, so a failing block shows what actually ran.
"""

from __future__ import annotations

import os
import subprocess
import sys

from pp_flower.config import format_run_config, parse_run_config

TINY_RUN_CONFIG = {"epochs": 1, "limit-train": 64, "limit-eval": 20, "batch-size": 16, "unet-base": 4,
                   "unet-depth": 2, "eval-chunk": 10, "num-threads": 1}
TINY_FLAGS = {  # per command: flags set to these values (added when absent)
    "train-classifier": {"--epochs": "1", "--limit-train": "256", "--limit-eval": "64"},
    "attack": {"--epochs": "1", "--limit-train": "128", "--limit-eval": "32", "--unet-base": "4",
               "--unet-depth": "2", "--batch-size": "64"},
    "simulate": {"--num-supernodes": "2"},
    "deploy-local": {"--users": "2"},
    "curve": {"--steps": "4", "--eval-every": "2", "--eval-images": "16", "--unet-base": "4", "--batch-size": "16"},
}
MODULES = {"ppflower": "cli.ppflower", "flower-simulation": "runtime.flower_simulation"}


def _set(args: list[str], flag: str, value: str) -> list[str]:
    if flag in args:
        i = args.index(flag)
        return [*args[:i + 1], value, *args[i + 2:]]
    return [*args, flag, value]


def shrink(program: str, args: list[str]) -> list[str]:
    command = "simulate" if program == "flower-simulation" else (args[0] if args else "")
    for flag, value in TINY_FLAGS.get(command, {}).items():
        if flag == "--num-supernodes" and flag in args:
            value = str(min(int(args[args.index(flag) + 1]), int(value)))
        args = _set(args, flag, value)
    if "--run-config" in args:
        i = args.index("--run-config")
        values = {**parse_run_config(args[i + 1]), **TINY_RUN_CONFIG}
        args = [*args[:i + 1], format_run_config(values), *args[i + 2:]]
    if command == "reproduce":  # every preset runs as the smoke preset (the cpu one takes hours)
        args = _set(_set(_set(args, "--preset", "smoke"), "--out", "results/readme-smoke"),
                    "--workdir", "runs/reproduce-readme-smoke")
    return args


def main() -> int:
    program, args = sys.argv[1], sys.argv[2:]
    if program == "ppflower" and args[:1] == ["demo"]:
        return _tiny_demo(args)
    tiny = shrink(program, args)
    print(f"[readme] {program} {' '.join(tiny)}", flush=True)
    return subprocess.run([sys.executable, "-m", MODULES[program], *tiny]).returncode


def _tiny_demo(args: list[str]) -> int:
    """``ppflower demo`` with the demo's budget made tiny (its stages and report unchanged)."""
    import experiments.demo as demo

    demo.CLASSIFIER.update(epochs=1, limit_train=256, limit_eval=64)
    demo.SIMULATION.update({**TINY_RUN_CONFIG, "limit-train": 128, "epochs": 1})
    demo.ATTACK.update(epochs=1, batch_size=64, unet_base=4, limit_train=128, limit_eval=32)
    from cli.ppflower import main as cli_main

    sys.argv = ["ppflower", *args]
    print(f"[readme] ppflower {' '.join(args)} (tiny budget)", flush=True)
    try:
        cli_main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PPFLOWER_QUIET", "1")
    sys.exit(main())
