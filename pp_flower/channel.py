"""The private channel between a user's per-message ClientApp processes and its long-lived trainer (deployment).

A Unix socket in the user's own directory, owner-only (0600, in a 0700 directory), authenticated by the node's
secret: ``multiprocessing.connection``'s HMAC challenge–response runs before a single byte of a request is read,
so a process without the secret is refused and never reaches the unpickler. What crosses it is what the
ClientApp would otherwise compute with: the provider's message contents as numpy arrays (config, sample ids,
∂L_class/∂x̂, evaluation results) in, the reply's x̂, ids, counters and metrics out (docs/deployment.md).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any

log = logging.getLogger("pp_flower.channel")


def make_secret(path: str | os.PathLike) -> bytes:
    """A fresh 32-byte node secret, written owner-only (created 0600: never readable by anyone else)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    os.replace(tmp, path)
    return secret


def read_secret(path: str | os.PathLike) -> bytes:
    return Path(path).read_bytes()


class TrainerServer:
    """Serves one object's methods on an authenticated Unix socket; calls run one at a time (one trainer)."""

    def __init__(self, target: Any, socket_path: str | os.PathLike, secret: bytes, hang_timeout: float = 600.0):
        self.target, self.path, self.hang_timeout = target, Path(socket_path), hang_timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists():
            self.path.unlink()
        old = os.umask(0o177)  # the socket is created 0600
        try:
            self.listener = Listener(str(self.path), family="AF_UNIX", authkey=secret)
        finally:
            os.umask(old)
        self.lock = threading.Lock()
        self.refused = 0
        self.closed = False

    def serve_forever(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except (AuthenticationError, EOFError, ConnectionError, OSError) as exc:
                if self.closed:
                    return
                self.refused += 1
                log.warning("trainer channel: refused a connection (%s)", exc.__class__.__name__)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        with conn:
            try:
                method, args = conn.recv()
            except (EOFError, OSError):
                return
            if method == "ping":  # alive and not stuck in one call for longer than hang_timeout
                ok = self.lock.acquire(timeout=self.hang_timeout)
                if ok:
                    self.lock.release()
                conn.send(("ok", "pong") if ok else ("error", "busy past the hang timeout"))
                return
            if method.startswith("_") or not callable(getattr(self.target, method, None)):
                conn.send(("error", f"unknown call '{method}'"))
                return
            with self.lock:
                try:
                    result = ("ok", getattr(self.target, method)(*args))
                except Exception as exc:  # noqa: BLE001 - any error travels back; the ClientApp raises it for Flower
                    result = ("error", f"{exc.__class__.__name__}: {exc}")
            try:
                conn.send(result)
            except (OSError, BrokenPipeError):
                pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()


class TrainerClient:
    """The ClientApp's end: each call is one connection, authenticated with the node's secret."""

    def __init__(self, socket_path: str | os.PathLike, secret: bytes, timeout: float):
        self.path, self.secret, self.timeout = str(socket_path), secret, timeout

    def request(self, method: str, *args: Any) -> Any:
        conn = self._connect()
        with conn:
            try:
                answer_challenge(conn, self.secret)  # what multiprocessing's Client does, but bounded in time:
                deliver_challenge(conn, self.secret)  # a hung (stopped) trainer must not hang its caller
                conn.send((method, args))
                if not conn.poll(self.timeout):
                    raise TimeoutError
                status, value = conn.recv()
            except (TimeoutError, BlockingIOError):
                raise TimeoutError(f"the user's trainer did not answer '{method}' within {self.timeout:g} s") from None
            except EOFError:
                raise RuntimeError("the user's trainer closed the channel (it died mid-call)") from None
        if status != "ok":
            raise RuntimeError(value)
        return value

    def _connect(self) -> Connection:
        """A blocking Unix-socket connection whose every read and write gives up after ``timeout`` seconds."""
        import socket
        import struct

        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        whole = int(self.timeout)
        timeval = struct.pack("ll", whole, int((self.timeout - whole) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        try:
            sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise RuntimeError(f"the user's trainer is not running ({self.path}: {exc.__class__.__name__})") from None
        return Connection(sock.detach())

    def setup(self, *args):
        return self.request("setup", *args)

    def call(self, *args):
        return self.request("call", *args)


def owner_only_socket(path: str | os.PathLike) -> bool:
    """True when ``path`` is a socket only its owner may use (what TrainerServer creates)."""
    st = os.stat(path)
    return stat.S_ISSOCK(st.st_mode) and (st.st_mode & 0o077) == 0
