"""``ppflower deploy-local --users N``: the app on Flower's Deployment Engine, every party a real process.

On loopback it does what docs/deployment.md tells the provider and the users to do on their machines:

1. credentials: a CA, the SuperLink's TLS certificate (SAN 127.0.0.1 / localhost) and one P-384 key pair
   per user's SuperNode (:func:`make_credentials`);
2. ``flower-superlink`` with TLS and ``--enable-supernode-auth`` (only registered nodes may connect);
3. ``flwr supernode register`` for each user's public key;
4. one SuperNode per user (``ppflower-supernode``: ``flower-supernode`` with shorter polling), each with its
   own private key (on separate machines each also gets ``--node-config out-dir=…``; on one machine the users
   write where the provider's run dir says, so ``WORKDIR/run`` has a simulation's layout: ``run.json`` and
   ``user-K/``, which ``ppflower attack --run-dir`` reads);
5. ``flwr run . <connection> --stream`` with the run config; the provider's ``run.json`` and every user's
   ``metrics.json`` are collected at the end;
6. every process is stopped on exit — normal end, error, Ctrl-C, or one of them dying.

``insecure=True`` (the CLI's ``--insecure``) turns TLS and authentication off; it exists for debugging only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pp_flower.config import format_run_config
from pp_flower.errors import PPFlowerError

REPO = Path(__file__).resolve().parent.parent
CONNECTION = "pp-local"


# ------------------------------------------------------------------------------------------ credentials
@dataclass
class Credentials:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: list[tuple[Path, Path]]  # (private key, public key) per user, OpenSSH format


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def make_credentials(folder: Path, users: int, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                     days: int = 30) -> Credentials:
    """A CA, a SuperLink certificate for ``hosts`` signed by it, and ``users`` SuperNode key pairs.

    The same files the shell commands in docs/deployment.md make with ``openssl`` and ``ssh-keygen``.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = name("pp-flower local CA")
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_cert = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                   .sign(ca_key, hashes.SHA256()))
    no_pw = serialization.NoEncryption()
    creds = Credentials(
        ca_cert=_write(folder / "ca.crt", ca_cert.public_bytes(pem)),
        server_cert=_write(folder / "server.pem", server_cert.public_bytes(pem)),
        server_key=_write(folder / "server.key", server_key.private_bytes(
            pem, serialization.PrivateFormat.TraditionalOpenSSL, no_pw), private=True),
        node_keys=[],
    )
    for i in range(users):
        creds.node_keys.append(make_node_key(folder, f"user-{i}"))
    return creds


def make_node_key(folder: Path, stem: str) -> tuple[Path, Path]:
    """A SuperNode's P-384 key pair in OpenSSH format (``ssh-keygen -t ecdsa -b 384``)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = _write(folder / stem, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()), private=True)
    public = _write(folder / f"{stem}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {stem}\n".encode())
    return private, public


def _bin(name: str) -> str:
    """A console script of the running environment (flwr's CLIs are installed next to its python)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------ processes
@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on loopback, as separate processes (a context manager that stops them)."""

    workdir: Path
    users: int = 2
    secure: bool = True
    fast_supernode: bool = True  # ppflower-supernode (shorter polling) instead of plain flower-supernode
    node_out_dirs: bool = True   # each node keeps its outputs in nodes/<name>/ (as on its own machine); False:
    #                              where the provider's run-dir says (run-dir/user-K/, the simulation's layout)
    port: int = 0
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ports: dict[str, int] = field(default_factory=dict)
    creds: Credentials | None = None

    def __post_init__(self):
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.flwr_home = self.workdir / "flwr-home"
        self.env = {**os.environ, "FLWR_HOME": str(self.flwr_home),
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
        # the processes run from the repo (and the ServerApp from Flower's copy of the app): paths the caller set
        # relative to its own directory, e.g. PPFLOWER_DATA_DIR=../shared/..., must not change meaning there
        for var in ("PPFLOWER_DATA_DIR", "PPFLOWER_VGG_WEIGHTS", "PPFLOWER_CACHE_DIR"):
            if self.env.get(var):
                self.env[var] = str(Path(self.env[var]).expanduser().resolve())
        # every temporary directory of the processes started here (a SuperNode's trainer socket and secret, its
        # SuperExec's FIFO) lies under one that stop() removes: none is left behind, even by a SIGKILLed node
        self.tmp = tempfile.mkdtemp(prefix="ppf-dl-")
        self.env["TMPDIR"] = self.tmp
        bindir = str(Path(sys.executable).parent)
        if bindir not in self.env.get("PATH", "").split(os.pathsep):
            self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")

    # --- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> "LocalDeployment":
        try:
            self.start()
        except BaseException:  # Ctrl-C or a failure half-way: stop what was started
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        for stale in [*self.workdir.glob("superlink.db*"), *self.workdir.glob("*.log")]:  # a previous run's state
            stale.unlink()
        if self.secure:
            self.creds = make_credentials(self.workdir / "certificates", self.users)
        self.write_connection()
        self.start_superlink()
        for i in range(self.users):
            if self.secure:
                self.register(self.creds.node_keys[i][1])
            self.start_supernode(i)

    def write_connection(self) -> None:
        """The `flwr` CLI's connection entry for this SuperLink (FLWR_HOME/config.toml)."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.port}"']
        lines.append(f'root-certificates = "{self.creds.ca_cert}"' if self.secure else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        logfile = open(self.workdir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                                start_new_session=True)  # own process group: stop() takes its children too
        logfile.close()
        self.processes[name] = proc
        return proc

    def start_superlink(self) -> None:
        argv = [_bin("flower-superlink"), "--port", str(self.port), "--disable-runtime-dependency-installation",
                "--database", ":flwr-in-memory:"]  # on disk, every message's arrays went through SQLite: 0.6 s a round
        if self.secure:
            argv += ["--ssl-ca-certfile", str(self.creds.ca_cert), "--ssl-certfile", str(self.creds.server_cert),
                     "--ssl-keyfile", str(self.creds.server_key), "--enable-supernode-auth"]
        else:
            argv += ["--insecure"]
        self._spawn("superlink", argv)
        self.wait_for_log("superlink", "Uvicorn running", 60)

    def register(self, public_key: Path) -> str:
        """``flwr supernode register``: allow the SuperNode holding this key to connect."""
        out = self.flwr(["supernode", "register", str(public_key), CONNECTION, "--format", "json"])
        return out

    def start_supernode(self, index: int, private_key: Path | None = None, name: str | None = None,
                        auth: bool = True) -> None:
        name = name or f"supernode-{index}"
        port = self.node_ports.get(name) or free_port()
        self.node_ports[name] = port
        launcher = [sys.executable, "-m", "runtime.supernode"] if self.fast_supernode else [_bin("flower-supernode")]
        argv = [*launcher, "--superlink", f"127.0.0.1:{self.port}", "--port", str(port), "--max-wait-time", "60"]
        if self.node_out_dirs:  # this user's h_θ, resume points and metrics stay here
            argv += ["--node-config", f'out-dir="{self.workdir / "nodes" / name}"']
        if self.secure:
            argv += ["--root-certificates", str(self.creds.ca_cert)]
            if auth:
                argv += ["--auth-supernode-private-key", str(private_key or self.creds.node_keys[index][0])]
        else:
            argv += ["--insecure"]
        self._spawn(name, argv)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.processes[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every process this deployment started, children included (e.g. the ``flwr-serverapp`` the SuperLink
        starts in a session of its own): SIGTERM, SIGKILL after 10 s, and return only once all of them are gone."""
        family = {pid for proc in self.processes.values() for pid in descendants(proc.pid)}
        family |= mentioning(str(self.workdir))  # e.g. a flwr-serverapp started in a session of its own
        family -= ancestors(os.getpid())  # never this command, nor the shell that started it
        for proc in self.processes.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for pid in family:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        while family and time.time() < deadline:
            family = {pid for pid in family if alive(pid)}
            time.sleep(0.05)
        for pid in family:
            _signal(pid, signal.SIGKILL)
        deadline = time.time() + 30
        while family and time.time() < deadline:
            family = {pid for pid in family if alive(pid)}
            time.sleep(0.05)
        shutil.rmtree(self.tmp, ignore_errors=True)  # the nodes' secrets and sockets: their owners are gone

    # --- helpers -------------------------------------------------------------------------------------
    def logtext(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for_log(self, name: str, needle: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if needle in self.logtext(name):
                return
            proc = self.processes[name]
            if proc.poll() is not None:
                raise PPFlowerError(f"{name} exited with code {proc.returncode}; its log:\n"
                                    f"{self.logtext(name)[-3000:]}")
            time.sleep(0.2)
        raise PPFlowerError(f"{name} did not print '{needle}' within {timeout:g} s; its log:\n"
                            f"{self.logtext(name)[-3000:]}")

    def flwr(self, args: list[str], timeout: float = 120) -> str:
        argv = [_bin("flwr"), *args]
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=timeout)
        if result.returncode != 0:
            raise PPFlowerError(f"`flwr {' '.join(args)}` failed ({result.returncode}):\n"
                                f"{result.stdout}{result.stderr}")
        return result.stdout

    def run_app(self, run_config: dict, timeout: float = 1800, on_line=None, watchdog=None) -> int:
        """``flwr run . <connection> --stream``; returns its exit code once the run's log stream ends.

        ``on_line`` sees every log line; ``watchdog()`` runs about once a second and may raise to abort.
        """
        import queue
        import threading

        rc = format_run_config(run_config)
        argv = [_bin("flwr"), "run", ".", CONNECTION, "--stream", "--run-config", rc]
        logfile = self.workdir / "flwr-run.log"
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                cwd=REPO, start_new_session=True)
        self.processes["flwr-run"] = proc
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: ([lines.put(line) for line in proc.stdout], lines.put(None)),
                         daemon=True).start()
        deadline = time.time() + timeout
        with open(logfile, "w") as log:
            while True:
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line:
                    log.write(line)
                    log.flush()
                    if on_line:
                        on_line(line.rstrip("\n"))
                if watchdog:
                    watchdog()
                if time.time() > deadline:
                    raise PPFlowerError(f"The run did not finish within {timeout:g} s (log: {logfile}).")
        return proc.wait()

    def dead(self) -> list[str]:
        return [n for n, p in self.processes.items() if n != "flwr-run" and p.poll() is not None]


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, so that none is left behind when we stop."""
    try:
        return [root, *(child.pid for child in psutil.Process(root).children(recursive=True))]
    except psutil.Error:  # gone (or not ours to see): only itself
        return [root]


def mentioning(text: str) -> set[int]:
    """Processes whose command line contains ``text`` (this deployment's own working directory)."""
    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if text in "\0".join(proc.info["cmdline"] or ()):  # None: a process whose command line we may not read
            found.add(proc.pid)
    return found


def ancestors(pid: int) -> set[int]:
    """``pid`` and its parents up to init."""
    chain = {pid} if pid > 1 else set()
    try:
        chain.update(parent.pid for parent in psutil.Process(pid).parents() if parent.pid > 1)
    except psutil.Error:
        pass
    return chain


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, exited but not yet reaped by its parent, counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------ the command
def deploy_local(users: int, workdir: Path, run_config: dict, secure: bool = True, log=print,
                 timeout: float = 3600, stream=print) -> dict:
    """Start everything, run the app, collect results, stop everything (also on Ctrl-C or a dead process)."""
    from runtime import signals
    from runtime.runlock import lock_dir, unlock_dir

    workdir = Path(workdir).resolve()
    run_dir = workdir / "run"  # run.json and user-K/: the layout of a simulation (`ppflower attack --run-dir` reads it)
    run_config = {**run_config, "run-dir": str(run_dir), "min-users": users}
    if not sys.stdout.isatty():  # piped or logged: the provider's streamed log lines without Flower's colour codes
        stream = (lambda plain: lambda line: plain(strip_ansi(line)))(stream)
    lock = lock_dir(workdir, "--workdir")  # one deployment per workdir (its certificates, logs and run dir)
    # Ctrl-C, `kill` (SIGTERM) and SIGHUP stop everything the same way, even when this process inherited an
    # ignored SIGINT (e.g. a background job)
    import threading

    in_main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in signals.SIGNALS} if in_main else {}
    signals.install()
    try:
        return _deploy(users, workdir, run_dir, run_config, secure, log, timeout, stream)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        unlock_dir(lock)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime in ns) of ``path``, None when it does not exist: run.json is replaced whole by each run."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _deploy(users, workdir, run_dir, run_config, secure, log, timeout, stream) -> dict:
    with LocalDeployment(workdir, users, secure, node_out_dirs=False) as dep:
        log(f"SuperLink on 127.0.0.1:{dep.port} ({'TLS + SuperNode authentication' if secure else 'INSECURE'}), "
            f"{users} SuperNodes; logs in {workdir}")

        warned: set[str] = set()

        def watchdog() -> None:
            for name in dep.dead():
                if name == "superlink":
                    raise PPFlowerError(f"The SuperLink died during the run; see {workdir}/superlink.log")
                if name not in warned:
                    warned.add(name)
                    log(f"[yellow]{name} exited (code {dep.processes[name].returncode}); the provider drops its "
                        f"user for the steps it misses — restart it to rejoin (see docs/deployment.md)[/]")

        summary_file = run_dir / "run.json"
        earlier = _identity(summary_file)  # a rerun into this workdir: the last run's run.json is there already
        rc = dep.run_app(run_config, timeout=timeout, on_line=stream, watchdog=watchdog)
        if rc != 0:
            raise PPFlowerError(f"`flwr run` exited with {rc}; see {workdir}/flwr-run.log")
    if _identity(summary_file) in (None, earlier):  # never report the last run's summary as this one's
        raise PPFlowerError(f"The run ended without writing {summary_file}; see {workdir}/flwr-run.log and "
                            f"{workdir}/superlink.log")
    summary = json.loads(summary_file.read_text())
    users_metrics = {}
    for path in sorted(run_dir.glob("user-*/metrics.json")):
        users_metrics[path.parent.name] = json.loads(path.read_text())
    return {"run": summary, "users": users_metrics, "workdir": str(workdir)}
