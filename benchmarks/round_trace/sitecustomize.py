"""Timeline of a deployment round across processes, for ``bench_deployment.py --trace`` (benchmarks only).

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; bench_deployment puts this folder there for the
deployment's processes only (SuperLink, ServerApp, SuperNodes, SuperExecs, ClientApps, trainers). Nothing
happens unless ``PPF_TRACE`` names a file: then the functions below are wrapped as their modules are imported,
and each call appends "<time.time()> <node> <event>+" on entry and "-" on return (one ``O_APPEND`` write per line,
so the processes' lines do not mix). ``<node>`` is the pid of the SuperNode a process descends from (the trainer,
SuperExec and ClientApps inherit it), or "-" for the provider's side. The wrapped calls are where a message
changes hands; ``bench_deployment.round_legs`` turns them into the parts of a round. Every HTTP request that a
Flower client makes (``ProtobufClient._unary_unary``: SuperNode → SuperLink, ClientApp → SuperNode, ServerApp →
SuperLink) and every SuperLink handler adds one line "<time> <node> request|handler <name> <seconds>", which
``bench_deployment.request_costs`` sums up.
"""

import importlib.abc
import importlib.util
import os
import sys
import time

_FILE = os.environ.get("PPF_TRACE")

# module -> [(attribute path, event name)]: the calls whose start and end mark a hand-over
_TARGETS = {
    "flwr.superlink.grid.http_grid": [("HttpGrid.push_messages", "provider.push"),
                                      ("HttpGrid.pull_messages", "provider.pull")],
    "flwr.supernode.start_client_internal": [("_pull_and_store_message", "node.pull"),
                                             ("_push_messages", "node.push")],
    "flwr.supernode.cli.flwr_clientapp": [("flwr_clientapp", "clientapp.main")],
    "flwr.supernode.runtime.run_clientapp": [("pull_task_input", "clientapp.pull"),
                                             ("push_message", "clientapp.push")],
    "pp_flower.user": [("UserTrainer.call", "trainer.call")],
}
# module -> [(function, name)]: calls whose duration is written as one line
_COSTS = {
    "flwr.supercore.protobuf.client": [("ProtobufClient._unary_unary", "request")],
    "flwr.superlink.servicer.fleet.fleet_handlers": [(f, "handler") for f in (
        "pull_messages", "push_messages", "pull_object", "push_object", "confirm_message_received")],
    "flwr.superlink.servicer.runtime.runtime_handlers": [(f, "handler") for f in (
        "pull_messages", "push_messages", "pull_object", "push_object", "confirm_message_received")],
}


def _write(event: str) -> None:
    fd = os.open(_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{time.time():.6f} {os.environ.get('PPF_TRACE_NODE', '-')} {event}\n".encode())
    finally:
        os.close(fd)


def _wrap_cost(owner, name: str, kind: str, module: str) -> None:
    fn = getattr(owner, name)
    side = "fleet" if ".fleet." in module else "runtime"

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            what = kwargs.get("rpc_method", "?").rsplit("/", 1)[-1] if kind == "request" else f"{side}.{name}"
            _write(f"{kind} {what} {time.perf_counter() - t0:.6f}")

    setattr(owner, name, timed)


def _wrap(owner, name: str, event: str) -> None:
    fn = getattr(owner, name)

    def traced(*args, **kwargs):
        _write(event + "+")
        result = fn(*args, **kwargs)
        if result is not None or event != "node.pull":  # an empty pull of the SuperNode hands nothing over
            if event != "provider.pull" or result:  # nor does a provider's pull that found no reply
                _write(event + "-")
        return result

    setattr(owner, name, traced)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _TARGETS and fullname not in _COSTS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            for attr, event in [*_TARGETS.get(fullname, []), *_COSTS.get(fullname, [])]:
                owner = module
                *parents, name = attr.split(".")
                for parent in parents:
                    owner = getattr(owner, parent)
                if fullname in _COSTS:
                    _wrap_cost(owner, name, event, fullname)
                else:
                    _wrap(owner, name, event)

        spec.loader.exec_module = exec_and_wrap
        return spec


if _FILE:
    with open("/proc/self/cmdline", "rb") as _f:  # sys.argv is not set yet for ``python -m``
        _argv = _f.read().decode(errors="replace").split("\0")
    if "runtime.supernode" in _argv or any(a.endswith("flower-supernode") for a in _argv[:2]):
        os.environ["PPF_TRACE_NODE"] = str(os.getpid())
    sys.meta_path.insert(0, _Hook())
