"""``ppflower serve``: step (5) as a network service — ψ classifies protected images on Ray Serve.

One Serve deployment (``PsiService``) with a FastAPI ingress holds ψ; ``--replicas`` copies of it share the load,
each on ``--cpus-per-replica`` cores and ``--num-gpus`` GPUs. Routes (the FastAPI page ``/docs`` lists them):

* ``GET  /v1/health``  — ``{"status": "ok"}``, no token (for load balancers and readiness checks);
* ``GET  /v1/info``    — class names, image size (H, W), channels, limits, top-k, versions; never weights;
* ``POST /v1/classify`` — a batch of protected 8-bit images (PNG files as ``multipart/form-data`` or one ``.npy``
  uint8 array (n, C, H, W) as ``application/x-npy``) → ``{"predictions": [{image, label, name, probability,
  top_k: [...]}, ...]}``.

Every request but the health check needs ``Authorization: Bearer <token>`` with a token from ``--tokens``; every
refused request gets a 4xx and ``{"error": "<one line>"}`` (pp_flower.serving does the checks). Images of all
concurrent requests are batched dynamically (``@serve.batch``) up to ``--batch-size`` images or
``--batch-wait-ms``. TLS is Serve's own: its HTTP proxy runs uvicorn with ``--ssl-certfile``/``--ssl-keyfile``.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` type of the routes Serve rebinds
import asyncio
import logging
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pp_flower.errors import PPFlowerError
from pp_flower.serving import API_VERSION, Limits, RequestError, check_bearer, parse_images, predictions

APP_NAME = "pp-flower"


@dataclass
class ServeOptions:
    """Everything ``ppflower serve`` takes besides ψ's checkpoint (see its --help for each)."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    num_gpus: float = 0.0
    cpus_per_replica: float = 1.0
    batch_size: int = 64
    batch_wait_ms: float = 5.0
    max_ongoing_requests: int = 128
    top_k: int = 3
    image_size: tuple[int, int] = (32, 32)
    max_images: int = 256
    max_request_bytes: int = 16 * 2**20
    token_digests: list[str] = field(default_factory=list)
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None
    ray_address: Optional[str] = None
    num_cpus: Optional[int] = None          # only for a Ray instance started here
    access_log: bool = False

    @property
    def limits(self) -> Limits:
        return Limits(image_size=tuple(self.image_size), channels=3, max_images=self.max_images,
                      max_request_bytes=self.max_request_bytes)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"{'https' if self.ssl_certfile else 'http'}://{host}:{self.port}"


def _error(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


api = FastAPI(title="pp-flower provider: ψ on protected images", version=API_VERSION,
              description="Step (5) of the framework: the provider classifies images protected by the user's "
                          "h_θ. Send 8-bit images (PNG files or one .npy uint8 array) with a bearer token.")


@api.exception_handler(RequestError)
async def _refused(_request: Request, exc: RequestError) -> JSONResponse:
    return _error(exc.status, str(exc))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:  # 404, 405
    return _error(exc.status_code, exc.detail)


@api.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
    return _error(422, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg')}")


@api.exception_handler(Exception)
async def _internal(_request: Request, exc: Exception) -> JSONResponse:
    # a bug, never a bad request (those are RequestErrors): one line for the caller, no traceback on the wire
    return _error(500, f"internal error ({type(exc).__name__})")


_CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                   "description": "8-bit RGB PNGs of the service's image size (GET /v1/info)"}}}},
    "application/x-npy": {"schema": {"type": "string", "format": "binary",
                                     "description": "one .npy uint8 array of shape (n, C, H, W)"}}}}}


@serve.deployment(name="psi")
@serve.ingress(api)
class PsiService:
    """ψ behind the routes above. ``classifier``: ψ's checkpoint path (read by each replica; on a multi-node
    cluster the path must exist on every node); ``options``: ServeOptions as a dict."""

    def __init__(self, classifier: str, options: dict[str, Any]):
        import torch

        from pp_flower.checkpoints import load_classifier
        from pp_flower.data import CIFAR10_CLASSES

        self.options = ServeOptions(**options)
        self.limits = self.options.limits
        self.digests = list(self.options.token_digests)
        self.device = "cuda" if self.options.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        torch.set_num_threads(max(1, int(self.options.cpus_per_replica)))
        model, blob = load_classifier(classifier)
        self.model = model.to(self.device)
        self.classes = list(blob.get("classes") or CIFAR10_CLASSES)
        self.arch = blob["arch"]
        self._predict.set_max_batch_size(self.options.batch_size)
        self._predict.set_batch_wait_timeout_s(self.options.batch_wait_ms / 1000)

    def _authorize(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.digests)

    async def _body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it passes the byte limit: never held in full when too big."""
        limit = self.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "malformed Content-Length header")
            if int(declared) > limit:
                raise RequestError(413, f"request body of {declared} bytes; at most {limit} (GET /v1/info)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"request body over {limit} bytes (GET /v1/info)")
        return bytes(body)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=lambda items: sum(len(x) for x in items))
    async def _predict(self, chunks: list[np.ndarray]) -> list[np.ndarray]:
        """Dynamic batching: the image chunks of all waiting requests (each uint8 (k, C, H, W)) → ψ once →
        softmax rows (k, K) per chunk. ψ runs in a thread so the replica keeps parsing requests meanwhile."""
        sizes = [len(c) for c in chunks]
        probs = await asyncio.to_thread(self._run, np.concatenate(chunks))
        return list(np.split(probs, np.cumsum(sizes)[:-1]))

    def _run(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(images).to(self.device).float().div_(255)  # ψ sees q / 255, as `classify` locally
            return torch.softmax(self.model(x).float(), dim=1).cpu().numpy()

    @api.get("/v1/health")
    def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/info")
    def info(self, request: Request) -> dict[str, Any]:
        from importlib.metadata import version

        self._authorize(request)
        return {"classes": self.classes, "image_size": list(self.limits.image_size), "channels": self.limits.channels,
                "dtype": "uint8", "max_images": self.limits.max_images,
                "max_request_bytes": self.limits.max_request_bytes, "top_k": self.options.top_k,
                "formats": ["multipart/form-data (PNG files)", "application/x-npy (uint8 (n, C, H, W))"],
                "model": self.arch, "api_version": API_VERSION, "service_version": version("pp-flower")}

    @api.post("/v1/classify", openapi_extra=_CLASSIFY_BODY)
    async def classify(self, request: Request) -> dict[str, Any]:
        self._authorize(request)  # before the body is read: an unauthenticated sender costs no decoding
        names, images = parse_images(await self._body(request), request.headers.get("content-type"), self.limits)
        step = self.options.batch_size
        parts = await asyncio.gather(*(self._predict(images[i:i + step]) for i in range(0, len(images), step)))
        preds = predictions(np.concatenate(parts), self.classes, self.options.top_k)
        return {"predictions": [{"image": name, **p} for name, p in zip(names, preds)]}


# ---- starting and stopping -------------------------------------------------------------------------------------


def _start_ray(options: ServeOptions) -> bool:
    """Attach to ``options.ray_address`` or start a small local Ray instance; True if this process started it."""
    import ray

    pythonpath = os.pathsep.join(p for p in [*sys.path, os.environ.get("PYTHONPATH", "")] if p)
    os.environ["PYTHONPATH"] = pythonpath  # replicas import sims.serve / pp_flower as this process does
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    try:
        if options.ray_address:
            ray.init(address=options.ray_address, runtime_env=runtime_env, logging_level="WARNING")
            return False
        # a small footprint: no dashboard, a 128 MiB object store (requests are kilobytes), only the cores asked for
        ray.init(num_cpus=options.num_cpus or os.cpu_count(), num_gpus=None, include_dashboard=False,
                 object_store_memory=128 * 2**20, runtime_env=runtime_env, logging_level="WARNING")
        return True
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise PPFlowerError(f"Ray did not start{f' at {options.ray_address}' if options.ray_address else ''}: "
                            f"{str(exc).splitlines()[0][:300]}") from None
    except Exception as exc:  # noqa: BLE001 - ray.init raises a bare Exception when its node times out
        if type(exc) is not Exception:
            raise
        raise PPFlowerError(f"Ray did not start: {str(exc).splitlines()[0][:300]}") from None


def _serve_was_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def check_options(classifier: Path, options: ServeOptions) -> dict[str, Any]:
    """Refuse bad options before Ray starts; returns ψ's checkpoint header (classes, arch)."""
    from pp_flower.checkpoints import load_classifier

    if options.replicas < 1:
        raise PPFlowerError(f"--replicas must be at least 1, got {options.replicas}.")
    if options.batch_size < 1 or options.max_images < 1 or options.max_request_bytes < 1024:
        raise PPFlowerError("--batch-size and --max-images must be ≥ 1 and --max-request-mb > 0.")
    if options.num_gpus < 0 or options.cpus_per_replica < 0:
        raise PPFlowerError("--num-gpus and --cpus-per-replica must be ≥ 0.")
    if bool(options.ssl_certfile) != bool(options.ssl_keyfile):
        raise PPFlowerError("TLS needs both --ssl-certfile and --ssl-keyfile.")
    for path in (options.ssl_certfile, options.ssl_keyfile):
        if path and not Path(path).is_file():
            raise PPFlowerError(f"TLS file {path} does not exist.")
    if not options.token_digests:
        raise PPFlowerError("No bearer tokens: pass --tokens FILE (one token per line).")
    _, blob = load_classifier(classifier)
    if blob.get("baseline") == "tanaka":
        raise PPFlowerError(f"{classifier} is ψ for Tanaka-encrypted images (6 channels); the service takes 3-channel "
                            "8-bit images (plain, h_θ-protected or pixel-encrypted).")
    return blob


def serve_classifier(classifier: Path, options: ServeOptions, log: Callable[[str], None] = print,
                     ready: Optional[Callable[[str], None]] = None, stop_after: Optional[float] = None) -> None:
    """Run the service until Ctrl-C or SIGTERM (or ``stop_after`` seconds), then stop everything started here:
    the application, Serve (if this call started it) and Ray (if this call started it).

    Raises PPFlowerError for bad options, a bad checkpoint or a port Serve could not bind."""
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    check_options(classifier, options)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    serve_started = False
    try:
        _start_ray(options)
        # SIGTERM (`kill`, a container stop) takes Ctrl-C's way out; set again because ray.init installs its own
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        serve_started = not _serve_was_running()
        logging_config = LoggingConfig(log_level="WARNING", enable_access_log=options.access_log)
        # serve.run restarts Serve with its defaults and warns that ours are kept: we print our own lines instead
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
        # one HTTP proxy, on the Ray head node: the one address (and the one place for the TLS files) users need
        serve.start(proxy_location="HeadOnly", logging_config=logging_config,
                    http_options=HTTPOptions(host=options.host, port=options.port, ssl_certfile=options.ssl_certfile,
                                             ssl_keyfile=options.ssl_keyfile))
        deployment = PsiService.options(
            num_replicas=options.replicas, max_ongoing_requests=options.max_ongoing_requests,
            ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.num_gpus})
        try:
            serve.run(deployment.bind(str(Path(classifier).resolve()), asdict(options)), name=APP_NAME,
                      route_prefix="/", logging_config=logging_config)
        except RuntimeError as exc:
            raise PPFlowerError(f"The service did not start: {str(exc).splitlines()[0][:300]}") from None
        log(f"serving ψ ({classifier}) at {options.url} — {options.replicas} replica(s); POST /v1/classify, "
            f"GET /v1/info, GET /v1/health, API docs at {options.url}/docs. Ctrl-C stops it.")
        if ready:
            ready(options.url)
        deadline = None if stop_after is None else time.monotonic() + stop_after
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        for sig in previous:  # a second Ctrl-C or SIGTERM must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        try:
            _shutdown(serve_started)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _shutdown(serve_started: bool) -> None:
    import ray

    if not ray.is_initialized():
        return
    try:
        if serve_started:
            serve.shutdown()  # the controller, the proxies and every replica
        else:
            serve.delete(APP_NAME)  # someone else's Serve: take only our application away
    finally:
        ray.shutdown()  # for a Ray instance started here, this also stops the raylet, GCS and workers ray.init started
