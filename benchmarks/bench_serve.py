"""Throughput and latency of ``ppflower serve`` against ψ run locally on the same cores.

    python benchmarks/bench_serve.py --concurrency 1 8 32 --images-per-request 1 16 --seconds 8 --rounds 3 \\
        --out benchmarks/results_serve_cpu2.json

For each concurrency c and request size k: *service* — c clients (one asyncio task each, one shared httpx
connection pool, loopback) each send k-image requests (.npy uint8) back to back for ``--seconds``; images/s and
per-request latency p50/p99. *local* — ψ in this process on batches of c·k images (what a perfect batcher would
run for c waiting requests), on the same number of torch threads as the service's replicas have cores; images/s and
the batch's latency. Local and service runs alternate, ``--rounds`` times, so both see the same background load;
the reported figure is the median over rounds, with every round in the JSON. Under a background load, CPU time is
shared per runnable thread, so a service of several processes can take a larger share of a busy box than one local
process: the JSON therefore also holds CPU time per image (the service's processes, the load generator, local ψ),
a measure of cost the background load does not skew. Also: the service's idle memory (RSS
and USS summed over every process it started: the CLI, Ray's GCS and raylet, Serve's controller and proxy, the
replicas), and the load average during the runs. ψ is a freshly initialised ResNet-20 (speed does not depend on
its weights) unless ``--classifier`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PPFLOWER_QUIET", "1")

from pp_flower.checkpoints import classifier_blob, load_classifier, save_atomic  # noqa: E402
from pp_flower.models import ResNet20  # noqa: E402
from pp_flower.serving import encode_npy  # noqa: E402

TOKEN = "bench-" + "0" * 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def service_memory(marker: str) -> dict:
    """RSS and USS (MiB) summed over the service's processes, and how many there are."""
    import psutil

    rss = uss = 0
    names = []
    for pid in _processes_with(marker):
        try:
            p = psutil.Process(pid)
            info = p.memory_full_info()
            rss += info.rss
            uss += info.uss
            names.append(p.name())
        except (psutil.Error, OSError):
            continue
    return {"rss_mib": round(rss / 2**20, 1), "uss_mib": round(uss / 2**20, 1), "processes": len(names),
            "names": sorted(names)}


def service_cpu_seconds(marker: str) -> float:
    """CPU time (user + system, s) used so far by the service's processes."""
    import psutil

    total = 0.0
    for pid in _processes_with(marker):
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except (psutil.Error, OSError):
            continue
    return total


def load_snapshot() -> dict:
    """The load average and the busiest processes that are not this benchmark's (the background load)."""
    import psutil

    busy = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_percent"]):
        busy.append(p)
    time.sleep(1.0)
    top = []
    for p in busy:
        try:
            cpu = p.cpu_percent(None)
            if cpu > 20:
                top.append({"cpu_percent": round(cpu), "cmd": " ".join(p.info["cmdline"] or [p.info["name"]])[:120]})
        except psutil.Error:
            continue
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "busy": sorted(top, key=lambda d: -d["cpu_percent"])[:5]}


async def _drive(url: str, concurrency: int, body: bytes, n_images: int, seconds: float) -> dict:
    """``concurrency`` workers send ``body`` back to back; images/s and latency (ms) of each request."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-npy"}
    latencies: list[float] = []
    errors = 0
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120, headers=headers) as client:
        # warm-up: every connection once, not counted
        await asyncio.gather(*(client.post("/v1/classify", content=body) for _ in range(concurrency)))
        start = time.perf_counter()
        deadline = start + seconds

        async def worker():
            nonlocal errors
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/classify", content=body)
                except httpx.HTTPError:  # e.g. a timeout on an overloaded box: counted, not fatal
                    errors += 1
                    continue
                if r.status_code != 200:
                    errors += 1
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"images_per_s": len(latencies) * n_images / elapsed, "p50_ms": _percentile(latencies, 50),
            "p99_ms": _percentile(latencies, 99), "requests": len(latencies), "errors": errors}


def run_local(model: torch.nn.Module, images: np.ndarray, seconds: float) -> dict:
    """ψ on one batch (q / 255, as the service runs it) again and again: images/s and the batch latency (ms)."""
    latencies = []
    with torch.inference_mode():
        x = torch.from_numpy(images)
        model(x.float().div(255))  # warm-up
        cpu = time.process_time()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            torch.softmax(model(x.float().div(255)), 1).numpy()
            latencies.append((time.perf_counter() - t0) * 1000)
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    n = len(latencies) * len(images)
    return {"images_per_s": n / elapsed, "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
            "batches": len(latencies), "cpu_ms_per_image": cpu * 1000 / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--images-per-request", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="local/service alternations per setting")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--cpus-per-replica", type=float, default=2.0, help="also the local run's torch threads")
    ap.add_argument("--batch-size", type=int, default=64, help="the service's dynamic batch (images)")
    ap.add_argument("--batch-wait-ms", type=float, default=2.0)
    ap.add_argument("--classifier", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    classifier = args.classifier
    if classifier is None:
        torch.manual_seed(0)
        classifier = work / "psi.pt"
        save_atomic(classifier_blob(ResNet20(10), "resnet20", 10), classifier)
    (work / "tokens").write_text(TOKEN + "\n")
    model, _ = load_classifier(classifier)
    threads = max(1, int(args.cpus_per_replica * args.replicas))
    torch.set_num_threads(threads)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    marker = f"PPFLOWER_BENCH_SERVE_{uuid.uuid4().hex}"
    cores = os.cpu_count()
    cmd = [sys.executable, "-m", "cli.ppflower", "serve",
           "--classifier", str(classifier), "--tokens", str(work / "tokens"),
           "--port", str(port), "--replicas", str(args.replicas), "--cpus-per-replica", str(args.cpus_per_replica),
           "--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
           "--num-cpus", str(max(cores, int(args.cpus_per_replica * args.replicas))),
           "--max-images", str(max(256, max(args.images_per_request)))]
    log = (work / "serve.log").open("w")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, marker: "1", "PYTHONPATH": str(ROOT)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    import httpx

    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"ppflower serve exited: {(work / 'serve.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        startup_s = time.monotonic() - started
        time.sleep(3)  # let start-up work (imports, Ray's first tasks) settle before measuring idle memory
        idle = service_memory(marker)
        print(f"service up in {startup_s:.1f} s; idle memory {idle['rss_mib']} MiB RSS, {idle['uss_mib']} MiB USS "
              f"over {idle['processes']} processes", flush=True)
        results = {"load_before": load_snapshot(), "settings": []}
        rng = np.random.default_rng(0)
        for k in args.images_per_request:
            for c in args.concurrency:
                images = rng.integers(0, 256, (k, 3, 32, 32), dtype=np.uint8)
                body = encode_npy(images)
                batch = rng.integers(0, 256, (c * k, 3, 32, 32), dtype=np.uint8)
                rounds = []
                for r in range(args.rounds):
                    local = run_local(model, batch, args.seconds)
                    cpu0 = service_cpu_seconds(marker), time.process_time()
                    service = asyncio.run(_drive(url, c, body, k, args.seconds))
                    n = service["requests"] * k
                    service_cpu = service_cpu_seconds(marker) - cpu0[0]
                    client_cpu = time.process_time() - cpu0[1]  # includes the warm-up requests: an upper bound
                    service.update(cpu_ms_per_image=service_cpu * 1000 / n,
                                   client_cpu_ms_per_image=client_cpu * 1000 / n)
                    load = round(os.getloadavg()[0], 2)
                    rounds.append({"local": local, "service": service, "loadavg_1m": load,
                                   "ratio": service["images_per_s"] / local["images_per_s"],
                                   "cpu_ratio": local["cpu_ms_per_image"] / service["cpu_ms_per_image"]})
                    print(f"k={k:3d} c={c:3d} round {r}: local {local['images_per_s']:8.0f} img/s, service "
                          f"{service['images_per_s']:8.0f} img/s (p50 {service['p50_ms']:.1f} ms, p99 "
                          f"{service['p99_ms']:.1f} ms, errors {service['errors']}), ratio "
                          f"{rounds[-1]['ratio']:.2f}; CPU ms/image local {local['cpu_ms_per_image']:.2f}, service "
                          f"{service['cpu_ms_per_image']:.2f} (+ client {service['client_cpu_ms_per_image']:.2f}), "
                          f"load {load}", flush=True)

                def med(side, key):
                    return round(statistics.median(x[side][key] for x in rounds), 2)

                results["settings"].append({
                    "images_per_request": k, "concurrency": c,
                    "local_images_per_s": med("local", "images_per_s"), "local_batch_p50_ms": med("local", "p50_ms"),
                    "service_images_per_s": med("service", "images_per_s"),
                    "service_p50_ms": med("service", "p50_ms"), "service_p99_ms": med("service", "p99_ms"),
                    "ratio": round(statistics.median(x["ratio"] for x in rounds), 3),
                    "local_cpu_ms_per_image": med("local", "cpu_ms_per_image"),
                    "service_cpu_ms_per_image": med("service", "cpu_ms_per_image"),
                    "client_cpu_ms_per_image": med("service", "client_cpu_ms_per_image"),
                    "cpu_ratio": round(statistics.median(x["cpu_ratio"] for x in rounds), 3), "rounds": rounds})
        results["load_after"] = load_snapshot()
        results["idle_memory"] = idle
        results["idle_memory_after"] = service_memory(marker)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            for pid in [proc.pid, *_processes_with(marker)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    results.update({
        "machine": {"cpu": cpu, "cores": cores, "avx512_bf16": "avx512_bf16" in flags, "amx": "amx_tile" in flags,
                    "python": platform.python_version(), "torch": torch.__version__},
        "service": {"startup_s": round(startup_s, 1), "replicas": args.replicas,
                    "cpus_per_replica": args.cpus_per_replica, "batch_size": args.batch_size,
                    "batch_wait_ms": args.batch_wait_ms, "transport": "HTTP/1.1 on loopback, no TLS, .npy bodies"},
        "local": {"torch_threads": threads}, "seconds": args.seconds, "command": " ".join(sys.argv)})
    for s in results["settings"]:
        print(f"k={s['images_per_request']:3d} c={s['concurrency']:3d}: local {s['local_images_per_s']:8.0f} img/s, "
              f"service {s['service_images_per_s']:8.0f} img/s, ratio {s['ratio']:.2f} (CPU per image: "
              f"{s['cpu_ratio']:.2f}), "
              f"p50 {s['service_p50_ms']} ms, p99 {s['service_p99_ms']} ms")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
        print(f"→ {args.out}")


if __name__ == "__main__":
    main()
