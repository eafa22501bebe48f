"""Step (5) as a service: ``ppflower serve`` (Ray Serve + FastAPI, TLS, bearer tokens) and ``ppflower classify
--server``. One service is started per module, as a subprocess on loopback with a self-signed certificate, and
stopped by the last test (SIGTERM), which also proves that nothing it started is left running.

The user's session goes through a recording TLS proxy (the test's own: it terminates TLS with the same
certificate and forwards to the service), so the privacy audit sees every byte the service received and sent."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from pp_flower.serving import NPY_MAGIC, PNG_SIGNATURE, Limits, RequestError, encode_npy, encode_png, parse_images
from tests import privacy
from tests.conftest import ROOT, processes_with

TOKENS = ("t0-" + "a" * 40, "t1-" + "b" * 40)
MAX_IMAGES = 8
MAX_REQUEST_MB = 0.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, env=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.ppflower", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


class Service:
    """``ppflower serve`` as a subprocess; every process it starts carries ``marker`` in its environment."""

    def __init__(self, args: list[str], url: str, verify, log: Path):
        self.marker = f"PPFLOWER_SERVE_FIXTURE_{uuid.uuid4().hex}"
        self.url, self.verify, self.log = url, verify, log
        env = {**os.environ, self.marker: "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.ppflower", "serve", *args], cwd=ROOT, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 300, retry_if: str | None = None) -> bool:
        """Wait for /v1/health; False if the service exited with ``retry_if`` in its log (the caller may retry)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if retry_if and retry_if in self.log.read_text():
                    return False
                pytest.fail(f"ppflower serve exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v1/health", verify=self.verify, timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        pytest.fail(f"ppflower serve not healthy after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> tuple[int | None, list[int]]:
        """Send ``sig``; return (exit code, pids of its processes still alive after ``timeout`` s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while (left := processes_with(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.proc.poll(), left

    def kill(self) -> None:
        """Last resort for a failed test: SIGKILL this service and every process that carries its marker."""
        for pid in [self.proc.pid, *processes_with(self.marker)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """ψ (random ResNet-20), h_θ (random tiny U-Net), tokens, a self-signed CA + server certificate, and 12 plain
    CIFAR-10 test images as PNG files."""
    from torchvision.utils import save_image

    from pp_flower.checkpoints import classifier_blob, save_atomic, transform_blob
    from pp_flower.data import CIFAR10_CLASSES, load_splits
    from pp_flower.models import UNet, build_classifier
    from runtime.deploy_local import make_credentials

    work = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    psi = build_classifier("resnet20", 10)
    save_atomic(classifier_blob(psi, "resnet20", 10, classes=list(CIFAR10_CLASSES)), work / "psi.pt")
    save_atomic(transform_blob(UNet(base=4, depth=2, arch="paper")), work / "h.pt")
    (work / "tokens.txt").write_text("# provider's tokens\n" + "\n".join(TOKENS) + "\n")
    (work / "user-token").write_text(TOKENS[1] + "\n")
    (work / "wrong-token").write_text("x" * 40 + "\n")
    creds = make_credentials(work / "certs", users=0)
    plain = load_splits(os.environ["PPFLOWER_DATA_DIR"], limit_eval=200).test.images
    photos = work / "photos"
    photos.mkdir()
    for i in range(12):
        save_image(plain[i].float() / 255, photos / f"photo{i:02d}.png")
    return {"work": work, "psi": work / "psi.pt", "h": work / "h.pt", "creds": creds, "photos": photos,
            "plain": plain, "psi_state": psi.state_dict()}


@pytest.fixture(scope="module")
def service(setup):
    creds = setup["creds"]
    port = _free_port()
    args = ["--classifier", str(setup["psi"]), "--tokens", str(setup["work"] / "tokens.txt"), "--port", str(port),
            "--ssl-certfile", str(creds.server_cert), "--ssl-keyfile", str(creds.server_key), "--num-cpus", "2",
            "--max-images", str(MAX_IMAGES), "--max-request-mb", str(MAX_REQUEST_MB), "--batch-size", "16"]
    verify = ssl.create_default_context(cafile=str(creds.ca_cert))
    svc = Service(args, f"https://127.0.0.1:{port}", verify, setup["work"] / "serve.log")
    try:
        if not svc.wait_healthy(retry_if="Ray did not start"):  # Ray's 30 s start-up limit, on an overloaded box
            svc = Service(args, svc.url, verify, setup["work"] / "serve-retry.log")
            svc.wait_healthy()
        yield svc
    finally:
        code, left = svc.stop()
        if left or code is None:
            svc.kill()


def _auth(token: str = TOKENS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- the recording TLS proxy -----------------------------------------------------------------------------------


class RecordingProxy:
    """TLS in (same certificate as the service), TLS out to the service; keeps every byte of each connection."""

    def __init__(self, upstream_port: int, creds):
        self.upstream_port = upstream_port
        self.server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_ctx.load_cert_chain(str(creds.server_cert), str(creds.server_key))
        self.client_ctx = ssl.create_default_context(cafile=str(creds.ca_cert))
        self.sent: list[bytearray] = []      # client → service, one per connection
        self.received: list[bytearray] = []  # service → client
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.server_ctx))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port, ssl=self.client_ctx,
                                                             server_hostname="127.0.0.1")
        sent, received = bytearray(), bytearray()
        self.sent.append(sent)
        self.received.append(received)

        async def pipe(src, dst, record):
            try:
                while data := await src.read(65536):
                    record += data
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                try:
                    dst.close()
                except Exception:  # noqa: BLE001
                    pass

        await asyncio.gather(pipe(reader, up_writer, sent), pipe(up_reader, writer, received))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def images_in_stream(data: bytes) -> list[tuple[str, np.ndarray]]:
    """Every PNG and every .npy array inside a recorded byte stream (HTTP framing around them is skipped), decoded
    to uint8 (…, C, H, W)."""
    from PIL import Image

    found = []
    for m in re.finditer(re.escape(PNG_SIGNATURE), data):
        with Image.open(io.BytesIO(data[m.start():])) as img:
            found.append((f"png@{m.start()}", np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy()))
    for m in re.finditer(re.escape(NPY_MAGIC), data):
        found.append((f"npy@{m.start()}", np.load(io.BytesIO(data[m.start():]), allow_pickle=False)))
    return found


def audit_requests(streams: list[bytes], plain: torch.Tensor) -> tuple[list[str], int]:
    """(hits, number of images found): plain images in decoded PNG/.npy payloads (tests/privacy.py's content check)
    and as raw uint8 bytes (CHW or HWC order) at any offset of the raw streams."""
    hits, n_images = [], 0
    needles = {bytes(img.numpy().tobytes()) for img in plain} | {bytes(img.permute(1, 2, 0).contiguous().numpy()
                                                                       .tobytes()) for img in plain}
    for i, data in enumerate(streams):
        decoded = images_in_stream(bytes(data))
        n_images += sum(1 if a.ndim == 3 else len(a) for _, a in decoded)
        hits += [f"conn{i}:{name}" for name in privacy.plain_image_hits_in(decoded, plain)]
        hits += [f"conn{i}:raw" for needle in needles if needle in data]
    return hits, n_images


def audit_responses(streams: list[bytes], state_dict: dict) -> list[str]:
    """ψ tensors (their first 16 values) in the raw response bytes, or among the numbers of the JSON bodies."""
    hits = privacy.parameter_hits_in([bytes(s) for s in streams], state_dict, prefix=16)
    numbers = [np.array([float(x) for x in re.findall(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?", bytes(s))], dtype=np.float32)
               for s in streams]
    return hits + privacy.parameter_hits_in([n.tobytes() for n in numbers], state_dict, prefix=16)


# ---- the user's session through the service --------------------------------------------------------------------


def _local_labels(setup) -> dict[str, int]:
    """What the service must answer: ψ(q / 255) on the same 8-bit q = round(255·h_θ(x)), computed here."""
    from pp_flower.checkpoints import load_classifier, load_transform_net
    from pp_flower.data import read_image
    from pp_flower.serving import quantize

    net, _ = load_transform_net(setup["h"])
    psi, _ = load_classifier(setup["psi"])
    files = sorted(setup["photos"].iterdir())
    with torch.no_grad():
        q = quantize(net(torch.stack([read_image(f).float() / 255 for f in files])))
        labels = psi(torch.from_numpy(q).float() / 255).argmax(1)
    return {f.name: int(y) for f, y in zip(files, labels)}


def test_classify_through_the_service_equals_local_psi_and_sends_no_plain_image(setup, service, tmp_path):
    proxy = RecordingProxy(int(service.url.rsplit(":", 1)[1]), setup["creds"])
    try:
        url = f"https://127.0.0.1:{proxy.port}"
        result = _cli("classify", "--server", url, "--transform", str(setup["h"]), "--token-file",
                      str(setup["work"] / "user-token"), "--ca-cert", str(setup["creds"].ca_cert), "--device", "cpu",
                      str(setup["photos"]))
        assert result.returncode == 0, result.stderr[-2000:]
        lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
        assert [n for n, *_ in lines] == sorted(p.name for p in setup["photos"].iterdir())
        from pp_flower.data import CIFAR10_CLASSES

        local = _local_labels(setup)
        assert {n: CIFAR10_CLASSES.index(label) for n, label, _ in lines} == local
        assert all(0 < float(p) <= 1 for *_, p in lines)
        assert len(set(local.values())) >= 1
        session = [bytes(s) for s in proxy.sent]

        # the audit: 12 protected images arrived (in 2 requests of ≤ 8), and none of them is a plain image
        hits, n_images = audit_requests(session, setup["plain"])
        assert n_images == 12, "the audit found fewer images than were sent: it would be vacuous"
        assert sum(s.count(b"POST /v1/classify") for s in session) == 2  # chunked by /v1/info's max_images
        assert hits == []
        # … nor did any response carry ψ's parameters
        assert audit_responses(proxy.received, setup["psi_state"]) == []

        # positive controls: a plain image planted in a request, as .npy or as PNG, is caught
        plain = setup["plain"][3:4].numpy()
        client = httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(setup["creds"].ca_cert)),
                              headers=_auth())
        before = len(proxy.sent)
        assert client.post("/v1/classify", content=encode_npy(plain),
                           headers={"Content-Type": "application/x-npy"}).status_code == 200
        assert client.post("/v1/classify", files=[("images", ("x.png", encode_png(plain[0]), "image/png"))]
                           ).status_code == 200
        client.close()
        planted, _ = audit_requests([bytes(s) for s in proxy.sent[before:]], setup["plain"])
        assert any("npy@" in h for h in planted) and any("png@" in h for h in planted), planted
        # and a response that carried (a part of) ψ's weights, as JSON numbers or as raw float32, is caught
        key = next(k for k, v in setup["psi_state"].items() if v.is_floating_point() and v.numel() >= 64)
        weight = setup["psi_state"][key].flatten()[:32]
        leak = json.dumps({"predictions": [], "w": [float(v) for v in weight]}).encode()
        assert audit_responses([leak], setup["psi_state"]) == [key]
        assert audit_responses([b"HTTP/1.1 200\r\n\r\n" + weight.numpy().tobytes()], setup["psi_state"])
    finally:
        proxy.close()


def test_client_protects_like_ppflower_protect(setup, tmp_path):
    """The 8-bit x̂ on the wire is exactly the PNG `ppflower protect` writes."""
    from pp_flower.checkpoints import load_transform_net
    from pp_flower.data import read_image
    from pp_flower.evaluation import protect_folder
    from pp_flower.serving import quantize

    protect_folder(setup["h"], setup["photos"], tmp_path)
    net, _ = load_transform_net(setup["h"])
    for f in sorted(setup["photos"].iterdir())[:4]:
        with torch.no_grad():
            q = quantize(net(read_image(f).float()[None] / 255))[0]
        assert np.array_equal(q, read_image(tmp_path / f.name).numpy())


def test_client_refuses_a_size_mismatch_before_sending(setup, service, tmp_path):
    from torchvision.utils import save_image

    for i in range(2):
        save_image(torch.rand(3, 64, 64), tmp_path / f"big{i}.png")
    proxy = RecordingProxy(int(service.url.rsplit(":", 1)[1]), setup["creds"])
    try:
        result = _cli("classify", "--server", f"https://127.0.0.1:{proxy.port}", "--transform", str(setup["h"]),
                      "--token-file", str(setup["work"] / "user-token"), "--ca-cert", str(setup["creds"].ca_cert),
                      "--device", "cpu", str(tmp_path))
    finally:
        proxy.close()
    assert result.returncode == 2
    assert "takes 32×32 images; refused: big0.png (64×64), big1.png (64×64). Nothing was sent." in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(b"/v1/classify" in s for s in proxy.sent)  # only /v1/info was asked


def test_info_describes_the_service_and_health_needs_no_token(setup, service):
    with httpx.Client(base_url=service.url, verify=service.verify) as client:
        assert client.get("/v1/health").json() == {"status": "ok"}
        info = client.get("/v1/info", headers=_auth()).json()
    assert info["classes"][:2] == ["airplane", "automobile"] and info["image_size"] == [32, 32]
    assert info["channels"] == 3 and info["max_images"] == MAX_IMAGES and info["service_version"]
    assert info["max_request_bytes"] == int(MAX_REQUEST_MB * 2**20)


# ---- TLS and tokens ---------------------------------------------------------------------------------------------


def test_tls_only_and_the_certificate_must_be_trusted(setup, service):
    plain_http = service.url.replace("https://", "http://")
    with pytest.raises(httpx.HTTPError):  # no cleartext HTTP on the service's port
        httpx.get(f"{plain_http}/v1/health", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a self-signed CA is not trusted
        httpx.get(f"{service.url}/v1/health", timeout=5)
    with httpx.Client(verify=service.verify) as client:  # … until the user is given ca.crt
        assert client.get(f"{service.url}/v1/health").status_code == 200
    result = _cli("classify", "--server", service.url, "--transform", str(setup["h"]), "--token-file",
                  str(setup["work"] / "user-token"), str(setup["photos"]))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "certificate is not trusted: pass --ca-cert" in result.stderr


def test_a_wrong_token_is_refused_by_the_client_with_one_line(setup, service):
    result = _cli("classify", "--server", service.url, "--transform", str(setup["h"]), "--token-file",
                  str(setup["work"] / "wrong-token"), "--ca-cert", str(setup["creds"].ca_cert), str(setup["photos"]))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "refused the request (401): invalid bearer token" in " ".join(result.stderr.split())


def _png16() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _rgb_png(size=32) -> bytes:
    return encode_png(np.random.default_rng(0).integers(0, 256, (3, size, size), dtype=np.uint8))


def _files(*parts: bytes) -> dict:
    return {"files": [("images", (f"img{i}.png", p, "image/png")) for i, p in enumerate(parts)]}


def _npy(x) -> dict:
    return {"content": encode_npy(x) if x.dtype == np.uint8 else _raw_npy(x),
            "headers": {"Content-Type": "application/x-npy"}}


def _raw_npy(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


BAD_REQUESTS = {  # name: (token, request kwargs, status, words in the error)
    "no token": (None, _files(_rgb_png()), 401, "missing bearer token"),
    "wrong token": ("z" * 40, _files(_rgb_png()), 401, "invalid bearer token"),
    "not an image": (TOKENS[0], _files(b"hello, I am text, not a PNG"), 415, "not a PNG"),
    "a JPEG": (TOKENS[0], _files(b"\xff\xd8\xff\xe0" + bytes(200)), 415, "not a PNG"),
    "16-bit PNG": (TOKENS[0], _files(_png16()), 422, "16-bit PNG"),
    "16-bit npy": (TOKENS[0], _npy(np.zeros((1, 3, 32, 32), np.uint16)), 422, "16-bit uint16"),
    "wrong size PNG": (TOKENS[0], _files(_rgb_png(64)), 422, "64×64"),
    "wrong size npy": (TOKENS[0], _npy(np.zeros((2, 3, 16, 16), np.uint8)), 422, "shape (2, 3, 16, 16)"),
    "too many images": (TOKENS[0], _files(*[_rgb_png()] * (MAX_IMAGES + 1)), 413, "at most 8"),
    "too many in npy": (TOKENS[0], _npy(np.zeros((MAX_IMAGES + 1, 3, 32, 32), np.uint8)), 413, "at most 8"),
    "empty body": (TOKENS[0], {"content": b"", "headers": {"Content-Type": "application/x-npy"}}, 400, "empty"),
    "truncated PNG": (TOKENS[0], _files(_rgb_png()[:60]), 422, "truncated or corrupt PNG"),
    "truncated npy": (TOKENS[0], {"content": encode_npy(np.zeros((2, 3, 32, 32), np.uint8))[:-100],
                                  "headers": {"Content-Type": "application/x-npy"}}, 422, "truncated .npy"),
    "body too large": (TOKENS[0], {"content": bytes(int(MAX_REQUEST_MB * 2**20) + 1),
                                   "headers": {"Content-Type": "application/x-npy"}}, 413, "request body of"),
    "wrong content type": (TOKENS[0], {"content": b"{}", "headers": {"Content-Type": "application/json"}}, 415,
                           "unsupported Content-Type"),
    "malformed multipart": (TOKENS[0], {"content": b"--xyz\r\nbroken", "headers": {
        "Content-Type": "multipart/form-data; boundary=abc"}}, 400, "malformed multipart"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_every_bad_request_gets_a_4xx_with_one_line_json(service, case):
    token, kwargs, status, words = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    headers = {**kwargs.pop("headers", {}), **(_auth(token) if token else {})}
    with httpx.Client(base_url=service.url, verify=service.verify, timeout=30) as client:
        response = client.post("/v1/classify", headers=headers, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and "\n" not in body["error"] and words in body["error"], body
    assert "Traceback" not in response.text


def test_unknown_routes_and_methods_are_json_4xx(service):
    with httpx.Client(base_url=service.url, verify=service.verify) as client:
        assert client.get("/v1/nope").json() == {"error": "Not Found"}
        response = client.get("/v1/classify", headers=_auth())
        assert response.status_code == 405 and list(response.json()) == ["error"]


# ---- request parsing and options, without a service ---------------------------------------------------------------


def test_bad_options_are_refused_in_one_line_before_ray_starts(setup, tmp_path):
    (tmp_path / "short").write_text("abc\n")
    cases = [
        (["serve", "--classifier", str(setup["psi"]), "--tokens", str(tmp_path / "missing")],
         "Cannot read the token file"),
        (["serve", "--classifier", str(setup["psi"]), "--tokens", str(tmp_path / "short")], "shorter than 16"),
        (["serve", "--classifier", str(setup["h"]), "--tokens", str(setup["work"] / "tokens.txt")], "classifier"),
        (["serve", "--classifier", str(setup["psi"]), "--tokens", str(setup["work"] / "tokens.txt"),
          "--ssl-certfile", str(setup["creds"].server_cert)], "both --ssl-certfile and --ssl-keyfile"),
        (["classify", str(setup["photos"])], "Give either --classifier"),
        (["classify", "--server", "https://127.0.0.1:1", str(setup["photos"])], "needs --transform"),
    ]
    from typer.testing import CliRunner

    from pp_flower.errors import PPFlowerError
    from cli.ppflower import app  # in-process: `ppflower` prints a PPFlowerError as one line and exits 2 (main)

    for args, words in cases:
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, PPFlowerError), (args, result.output, result.exception)
        assert words in str(result.exception) and "\n" not in str(result.exception), (args, result.exception)


def test_parse_images_takes_both_formats_and_keeps_the_pixels():
    limits = Limits(max_images=4)
    x = np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    names, got = parse_images(encode_npy(x), "application/x-npy", limits)
    assert names == ["0", "1", "2"] and np.array_equal(got, x)
    names, got = parse_images(_raw_npy(np.asfortranarray(x)), "application/x-npy", limits)
    assert np.array_equal(got, x)
    body = httpx.Request("POST", "http://x", files=[("images", (f"{i}.png", encode_png(img), "image/png"))
                                                   for i, img in enumerate(x)])
    body.read()
    names, got = parse_images(body.content, body.headers["content-type"], limits)
    assert names == ["0.png", "1.png", "2.png"] and np.array_equal(got, x)
    with pytest.raises(RequestError) as err:
        parse_images(encode_npy(np.zeros((5, 3, 32, 32), np.uint8)), "application/x-npy", limits)
    assert err.value.status == 413


# ---- stopping ---------------------------------------------------------------------------------------------------


def test_sigterm_stops_the_service_and_everything_it_started(service):
    """Last in this module: SIGTERM → the service, Serve and its own Ray instance are gone."""
    assert processes_with(service.marker), "the service's processes should carry the marker"
    started = time.monotonic()
    code, left = service.stop(signal.SIGTERM)
    assert code == 0 and left == [], (code, left, service.log.read_text()[-2000:])
    assert time.monotonic() - started < 60
    assert "service stopped." in service.log.read_text()


@pytest.mark.slow
def test_ctrl_c_stops_a_plain_http_service(setup, tmp_path):
    """Ctrl-C (SIGINT) takes the same way out; and without --ssl-certfile the service speaks plain HTTP."""
    port = _free_port()
    svc = Service(["--classifier", str(setup["psi"]), "--tokens", str(setup["work"] / "tokens.txt"), "--port",
                   str(port), "--num-cpus", "1"], f"http://127.0.0.1:{port}", True, tmp_path / "serve.log")
    try:
        svc.wait_healthy()
        assert httpx.get(f"{svc.url}/v1/info", headers=_auth(TOKENS[1])).status_code == 200
        code, left = svc.stop(signal.SIGINT)
        assert code == 0 and left == [], (code, left)
    finally:
        if svc.proc.poll() is None or processes_with(svc.marker):
            svc.kill()
