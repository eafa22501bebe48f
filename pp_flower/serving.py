"""Step (5) over the network: the wire format of protected images, request validation, and the user's client.

The provider's service (``ppflower serve``, sims/serve.py) receives protected images x̂ as **8-bit** arrays: the
user computes x̂ = h_θ(x) ∈ [0, 1], quantises q = round(255·x̂) to uint8 (exactly what ``ppflower protect`` writes
as PNG) and sends q; ψ runs on q / 255. This module holds what both sides share, without Ray or FastAPI:

* :func:`quantize`, :func:`encode_png`, :func:`encode_npy` — the user's side of the wire format;
* :func:`parse_images` — the provider's side: a request body (PNG files in ``multipart/form-data`` or one
  ``.npy`` uint8 array of shape (n, C, H, W)) → a uint8 array (n, C, H, W), or a :class:`RequestError` that
  carries a 4xx status and a one-line message;
* :class:`ServiceClient` and :func:`classify_remote` — the user's client behind ``ppflower classify --server``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from pp_flower.errors import PPFlowerError

API_VERSION = "1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"
NPY_TYPES = ("application/x-npy", "application/octet-stream")


class RequestError(PPFlowerError):
    """A request the service refuses: ``status`` is the HTTP status (4xx), the message one line for the caller."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may carry. ``max_request_bytes``: the whole body (bytes); ``max_images``: images per
    request; ``image_size`` (H, W) and ``channels``: the only image shape ψ takes."""

    image_size: tuple[int, int] = (32, 32)
    channels: int = 3
    max_images: int = 256
    max_request_bytes: int = 16 * 2**20

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "image_size": list(self.image_size)}


# ---- the user's side -------------------------------------------------------------------------------------------


def quantize(x) -> np.ndarray:
    """[0, 1] float images (torch or numpy, any shape) → uint8 q = round(255·x), as torchvision's ``save_image``
    (and so ``ppflower protect``) rounds them: floor(255·x + 0.5), clamped to [0, 255]."""
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.clip(np.floor(arr.astype(np.float64) * 255 + 0.5), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """One uint8 image (C, H, W), C = 3 → an 8-bit RGB PNG (lossless)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(images: np.ndarray) -> bytes:
    """uint8 images (n, C, H, W) → the bytes of a ``.npy`` file (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


# ---- the provider's side ---------------------------------------------------------------------------------------


def token_digest(token: str) -> str:
    """SHA-256 of a bearer token (hex): the service keeps and compares digests, never the tokens themselves."""
    return hashlib.sha256(token.encode()).hexdigest()


def read_tokens(path: str | Path) -> list[str]:
    """Bearer tokens from a file: one per line; blank lines and lines starting with ``#`` are ignored.

    Raises PPFlowerError if the file is missing, empty, or holds a token shorter than 16 characters."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PPFlowerError(f"Cannot read the token file {path}: {exc.strerror or exc}.") from None
    tokens = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not tokens:
        raise PPFlowerError(f"Token file {path} holds no token (one per line; e.g. `openssl rand -hex 32 > {path}`).")
    short = [i for i, t in enumerate(tokens) if len(t) < 16 or any(c.isspace() for c in t)]
    if short:
        raise PPFlowerError(f"Token file {path}: token {short[0] + 1} is shorter than 16 characters or contains "
                            "spaces; use random tokens, e.g. `openssl rand -hex 32`.")
    return tokens


def check_bearer(authorization: str | None, digests: Iterable[str]) -> None:
    """Raise RequestError(401) unless ``authorization`` is ``Bearer <token>`` with a token whose digest is known.
    Every digest is compared in constant time, so timing tells nothing about which one nearly matched."""
    if not authorization:
        raise RequestError(401, "missing bearer token: send the header 'Authorization: Bearer <token>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RequestError(401, "malformed Authorization header: expected 'Bearer <token>'")
    digest = token_digest(token.strip())
    if not any([hmac.compare_digest(digest, d) for d in digests]):
        raise RequestError(401, "invalid bearer token")


def _png_header(data: bytes, name: str) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, read before any decoding."""
    if not data.startswith(PNG_SIGNATURE):
        raise RequestError(415, f"{name}: not a PNG image (send 8-bit RGB PNGs or one .npy uint8 array)")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise RequestError(422, f"{name}: truncated or corrupt PNG (no IHDR chunk)")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def decode_png(data: bytes, limits: Limits, name: str = "image") -> np.ndarray:
    """An 8-bit RGB PNG → uint8 (3, H, W). Size and bit depth are checked from the header before decoding (no
    decompression bomb is ever inflated). Raises RequestError: 415 not a PNG, 422 16-bit / wrong size / not RGB /
    truncated or corrupt."""
    from PIL import Image

    width, height, depth, colour = _png_header(data, name)
    if depth != 8:
        raise RequestError(422, f"{name}: {depth}-bit PNG; the service takes 8-bit images (quantise x̂ to uint8)")
    if (height, width) != tuple(limits.image_size):
        raise RequestError(422, f"{name}: image is {width}×{height}, the service takes "
                                f"{limits.image_size[1]}×{limits.image_size[0]} (GET /v1/info)")
    if colour != 2 or limits.channels != 3:  # 2 = truecolour RGB; palette, grey or alpha would change the pixels
        raise RequestError(422, f"{name}: PNG colour type {colour}; the service takes RGB PNGs (colour type 2)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the sender's corrupt file
        raise RequestError(422, f"{name}: truncated or corrupt PNG ({str(exc).splitlines()[0][:120]})") from None
    if arr.shape != (height, width, 3):
        raise RequestError(422, f"{name}: decoded to shape {arr.shape}, expected ({height}, {width}, 3)")
    return arr.transpose(2, 0, 1)


def decode_npy(data: bytes, limits: Limits) -> np.ndarray:
    """``.npy`` bytes → uint8 (n, C, H, W). Raises RequestError: 415 not a .npy file, 422 another dtype (e.g.
    16-bit) or shape, 413 too many images, 422 truncated."""
    if not data.startswith(NPY_MAGIC):
        raise RequestError(415, "body is not a .npy file (send one uint8 array of shape (n, C, H, W), or PNGs as "
                                "multipart/form-data)")
    try:
        buf = io.BytesIO(data)
        fmt = np.lib.format
        version = fmt.read_magic(buf)  # the header only: shape and dtype are checked before any pixel is read
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(buf)
    except Exception as exc:  # noqa: BLE001
        raise RequestError(422, f"corrupt .npy header ({str(exc).splitlines()[0][:120]})") from None
    expected = (limits.channels, *limits.image_size)
    if dtype != np.uint8:
        bits = f"{dtype.itemsize * 8}-bit " if dtype.kind in "ui" else ""
        raise RequestError(422, f".npy array has dtype {bits}{dtype}; the service takes 8-bit images (uint8)")
    if len(shape) != 4 or tuple(shape[1:]) != expected:
        raise RequestError(422, f".npy array has shape {tuple(shape)}, "
                                f"the service takes (n, {', '.join(map(str, expected))})")
    check_count(shape[0], limits)
    payload = data[buf.tell():]
    need = int(np.prod(shape))
    if len(payload) < need:
        raise RequestError(422, f"truncated .npy: {len(payload)} of {need} bytes of pixels")
    arr = np.frombuffer(payload, dtype=np.uint8, count=need).reshape(shape[::-1] if fortran else shape)
    return arr.transpose(3, 2, 1, 0) if fortran else arr


def check_count(n: int, limits: Limits) -> None:
    if n < 1:
        raise RequestError(400, "no images in the request")
    if n > limits.max_images:
        raise RequestError(413, f"{n} images in one request; at most {limits.max_images} (GET /v1/info), "
                                "split the batch")


def parse_multipart(body: bytes, content_type: str, limits: Limits) -> list[tuple[str, bytes]]:
    """``multipart/form-data`` body → [(file name, bytes)] of its file parts (in order); fields are ignored.
    Raises RequestError 400 on a malformed body, 413 on more than ``limits.max_images`` files."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart/form-data without a boundary")
    parts: list[dict] = []
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin():
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data, start, end):
        header_field.extend(data[start:end])

    def on_header_value(data, start, end):
        header_value.extend(data[start:end])

    def on_header_end():
        parts[-1]["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_part_data(data, start, end):
        parts[-1]["data"].extend(data[start:end])

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data})
    try:
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # noqa: BLE001 - python-multipart raises its own error types
        raise RequestError(400, f"malformed multipart body ({str(exc).splitlines()[0][:120]})") from None
    files = []
    for i, part in enumerate(parts):
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        if b"filename" not in disposition:
            continue
        files.append((disposition[b"filename"].decode("utf-8", "replace") or f"image-{i}", bytes(part["data"])))
        if len(files) > limits.max_images:
            raise RequestError(413, f"more than {limits.max_images} images in one request; at most {limits.max_images} "
                                        "(GET /v1/info), split the batch")
    return files


def parse_images(body: bytes, content_type: str | None, limits: Limits) -> tuple[list[str], np.ndarray]:
    """A request body → (names, uint8 images (n, C, H, W)). ``content_type``: ``multipart/form-data`` (PNG files,
    any field name) or ``application/x-npy`` / ``application/octet-stream`` (one ``.npy`` array; names are its
    indices). Raises RequestError (4xx, one line) for every malformed request."""
    if not body:
        raise RequestError(400, "empty request body: send PNG files as multipart/form-data or one .npy uint8 array")
    if len(body) > limits.max_request_bytes:
        raise RequestError(413, f"request body over {limits.max_request_bytes} bytes (GET /v1/info)")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        files = parse_multipart(body, content_type or "", limits)
        check_count(len(files), limits)
        return [n for n, _ in files], np.stack([decode_png(data, limits, name) for name, data in files])
    if kind in NPY_TYPES:
        images = decode_npy(body, limits)
        return [str(i) for i in range(len(images))], images
    raise RequestError(415, f"unsupported Content-Type '{kind or 'none'}': send multipart/form-data (PNG files) or "
                            "application/x-npy (one uint8 array of shape (n, C, H, W))")


def predictions(probs: np.ndarray, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    """Softmax rows (n, K) → one dict per image: ``label`` (class index), ``name``, ``probability`` of that class,
    and ``top_k``: the k most probable classes as [{label, name, probability}], most probable first."""
    k = max(1, min(top_k, probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row, idx in zip(probs, order):
        top = [{"label": int(j), "name": classes[j], "probability": round(float(row[j]), 6)} for j in idx]
        out.append({**top[0], "top_k": top})
    return out


# ---- the user's client -----------------------------------------------------------------------------------------


class ServiceClient:
    """A client of the provider's service. ``server``: its base URL (``https://host:port``); ``token``: a bearer
    token; ``ca_cert``: the CA file that signed the server's certificate (None: the system's trust store).

    Every failure (unreachable, TLS, refused token, a 4xx) raises PPFlowerError with the service's one-line error."""

    def __init__(self, server: str, token: str | None = None, ca_cert: str | Path | None = None,
                 timeout: float = 60.0):
        import httpx

        if not server.startswith(("http://", "https://")):
            raise PPFlowerError(f"--server must be an http:// or https:// URL, got '{server}'.")
        verify: Any = True
        if ca_cert is not None:
            import ssl

            if not Path(ca_cert).is_file():
                raise PPFlowerError(f"CA certificate {ca_cert} does not exist.")
            verify = ssl.create_default_context(cafile=str(ca_cert))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        self._http = httpx.Client(base_url=self.server, headers=headers, verify=verify, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ServiceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> dict[str, Any]:
        import httpx

        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = (" (the server's certificate is not trusted: pass --ca-cert with the CA that signed it)"
                    if "CERTIFICATE_VERIFY_FAILED" in reason else "")
            raise PPFlowerError(f"Cannot reach the service at {self.server}: {reason}{hint}.") from None
        except httpx.HTTPError as exc:
            raise PPFlowerError(f"Request to {self.server}{path} failed: {type(exc).__name__}: {exc}.") from None
        try:
            payload = response.json()
        except ValueError:
            payload = {"error": response.text[:200]}
        if response.status_code >= 400:
            raise PPFlowerError(f"The service refused the request ({response.status_code}): "
                                f"{payload.get('error', payload)}")
        return payload

    def info(self) -> dict[str, Any]:
        """GET /v1/info: class names, image size (H, W), channels, limits, version."""
        return self._request("GET", "/v1/info")

    def classify(self, images: np.ndarray, fmt: str = "npy", names: list[str] | None = None) -> list[dict[str, Any]]:
        """POST /v1/classify with uint8 images (n, C, H, W), as one ``.npy`` array (``fmt="npy"``) or as PNG files
        (``fmt="png"``); returns the service's predictions, one dict per image (see :func:`predictions`)."""
        if images.dtype != np.uint8 or images.ndim != 4:
            raise PPFlowerError(f"images must be uint8 (n, C, H, W), got {images.dtype} {tuple(images.shape)}.")
        if fmt == "npy":
            body = self._request("POST", "/v1/classify", content=encode_npy(images),
                                 headers={"Content-Type": "application/x-npy"})
        else:
            names = names or [f"{i}.png" for i in range(len(images))]
            files = [("images", (n, encode_png(img), "image/png")) for n, img in zip(names, images)]
            body = self._request("POST", "/v1/classify", files=files)
        return body["predictions"]


def classify_remote(server: str, transform: str | Path, input_dir: str | Path, token: str | None = None,
                    ca_cert: str | Path | None = None, device: str = "cpu", fmt: str = "npy"
                    ) -> list[tuple[str, dict[str, Any]]]:
    """Step (4) + (5) for a user: protect every image of ``input_dir`` locally with h_θ and send only the 8-bit x̂
    to the provider's service; returns [(file name, prediction)] in file-name order.

    The images' size is checked against the service's (GET /v1/info) before anything is protected or sent.
    Raises PPFlowerError: no images, a size mismatch (lists the files), a refused request."""
    import torch

    from pp_flower.checkpoints import load_transform_net
    from pp_flower.evaluation import _images_in, _read

    net, _ = load_transform_net(transform)
    net = net.to(device).eval()
    files = _images_in(Path(input_dir))
    with ServiceClient(server, token, ca_cert) as client:
        info = client.info()
        size = tuple(info["image_size"])
        images = [(f, _read(f)) for f in files]
        bad = [f"{f.name} ({x.shape[2]}×{x.shape[1]})" for f, x in images if tuple(x.shape[1:]) != size]
        if bad:
            raise PPFlowerError(f"The service takes {size[1]}×{size[0]} images; refused: {', '.join(bad[:10])}"
                                f"{' …' if len(bad) > 10 else ''}. Nothing was sent.")
        out: list[tuple[str, dict[str, Any]]] = []
        chunk = max(1, int(info["max_images"]))
        with torch.no_grad():
            for start in range(0, len(images), chunk):
                part = images[start:start + chunk]
                x = torch.stack([x for _, x in part]).to(device)
                q = quantize(net(x))  # only the 8-bit x̂ leaves this machine
                preds = client.classify(q, fmt=fmt, names=[f.name for f, _ in part])
                out += [(f.name, p) for (f, _), p in zip(part, preds)]
    return out
