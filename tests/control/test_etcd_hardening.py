"""Issue 10 items 4, 7, 9, 10 and 13 against a real etcd (Debian's etcd-server):

- values under the prefix larger than gRPC's default 4 MiB receive limit (item 7);
- bad TLS files and a wrong password are one-line configuration errors at once, and the
  password can be given without showing in ps (items 9, 4);
- renewals and restarts keep one etcd lease per key (item 10, counted with
  ``etcdctl lease list``);
- the watch's backoff starts small again after a good reconnect (item 13; its one
  warning / one info per outage is checked on the 3-node testbed in netns/test_etcd_daemon.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from control import subnet_manager
from control.config import parse_config
from control.etcd_endpoints import TlsFiles, parse_endpoints
from control.etcd_registry import EtcdRegistry
from control.kv import RegistryConfigError, RegistryError
from control.subnet_manager import SubnetManager
from overlay.lab.netns import netns_pids
from tests.helpers.commands import fatal_text
from tests.helpers.etcd_server import EtcdServer, etcd_in_netns
from tests.helpers.paths import ROOT
from tests.helpers.pki import make_pki
from tests.helpers.watching import Recorder, start_watch, wait_until

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None or shutil.which("openssl") is None,
    reason="needs etcd, etcdctl and openssl (`make setup` installs them)",
)

NETWORK = "198.18.0.0/16"


def lease_ids(server: EtcdServer) -> set[int]:
    """``etcdctl lease list``: every etcd lease object the server holds. As integers: etcdctl
    zero-pads the hex IDs it prints to 16 digits, so a string compare with ``f"{id:x}"``
    fails whenever the member ID (the ID's high bits) starts with a zero nibble."""
    out = server.ctl("lease", "list").stdout.split()
    return {int(word, 16) for word in out[3:]}  # "found N leases" then one hex ID a line


def child_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


@pytest.fixture(scope="module")
def lo_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, EtcdServer]]:
    """A namespace (lo only) with a plain etcd on 127.0.0.1, for the daemons of this module."""
    with etcd_in_netns(tmp_path_factory.mktemp("hard") / "etcd", "hetc") as found:
        yield found


def overlay_run(ns: str, tmp_path: Path, *args: str) -> list[str]:
    return [
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-m",
        "overlay",
        "run",
        "--iface",
        "lo",
        "--subnet-file",
        str(tmp_path / "subnet.env"),
        "--status-socket",
        str(tmp_path / "status.sock"),
        *args,
    ]


def refused(
    ns: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[str, float]:
    """Run a daemon that must fail at once: (its one error line, seconds it took)."""
    started = time.monotonic()
    result = subprocess.run(
        overlay_run(ns, tmp_path, "--registry-timeout", "8", *args),
        capture_output=True,
        text=True,
        timeout=60,
        env=env or child_env(),
    )
    took = time.monotonic() - started
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    lines = lines[1:] if lines and "] registry " in lines[0] else lines  # which registry
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    return fatal_text(lines[0]), took


class Daemon:
    """One `overlay run` in the background; stopped with SIGTERM."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=env or child_env()
            )

    def wait_started(self, subnet_env: Path, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not subnet_env.exists():
            assert self.proc.poll() is None, self.log.read_text()[-1500:]
            assert time.monotonic() < deadline, self.log.read_text()[-1500:]
            time.sleep(0.05)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=15)


# -- item 7: more than 4 MiB under the prefix -------------------------------------------------


def test_values_over_grpcs_default_limit_do_not_stop_a_start(
    lo_etcd: tuple[str, EtcdServer], tmp_path: Path
) -> None:
    ns, server = lo_etcd
    prefix = f"/big{uuid.uuid4().hex[:8]}/network"
    server.put(f"{prefix}/config", json.dumps({"Network": NETWORK}))
    big = "x" * 1_400_000  # under etcd's --max-request-bytes (1.5 MiB); 4 of them: 5.6 MB
    for i in range(4):
        server.ctl("put", f"{prefix}/subnets/junk-{i}", input=big)  # too long for argv
    log = tmp_path / "daemon.log"
    daemon = Daemon(
        overlay_run(
            ns,
            tmp_path,
            "--etcd-endpoints",
            server.endpoint,
            "--etcd-prefix",
            prefix,
            "--registry-timeout",
            "8",
            "--log-format",
            "json",
        ),
        log,
    )
    try:
        daemon.wait_started(tmp_path / "subnet.env")
        # Each junk key is one bounded warning (the key, never the 1.4 MB value).
        deadline = time.monotonic() + 10
        while log.read_text().count("lease_record_invalid") < 4:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        lines = log.read_text().splitlines()
        assert max(len(line) for line in lines) < 1000
        assert sum("lease_record_invalid" in line for line in lines) == 4
    finally:
        assert daemon.stop() == 0


async def test_a_response_over_the_limit_names_the_real_cause(
    lo_etcd: tuple[str, EtcdServer],
) -> None:
    ns, server = lo_etcd
    prefix = f"/lim{uuid.uuid4().hex[:8]}/network"
    server.ctl("put", f"{prefix}/subnets/junk", input="x" * 300_000)
    # From the root namespace the etcd in `ns` is not reachable on 127.0.0.1: run inside.
    script = f"""
import asyncio
from control.etcd_endpoints import parse_endpoints
from control.etcd_registry import EtcdRegistry
from control.kv import RegistryConfigError
async def main():
    registry = EtcdRegistry(parse_endpoints({server.endpoint!r}), max_receive=100_000)
    try:
        await registry.list_prefix({prefix + "/subnets/"!r})
    except RegistryConfigError as e:
        print("config-error", e)
    finally:
        await registry.close()
asyncio.run(main())
"""
    result = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert result.stdout.startswith("config-error "), result.stdout + result.stderr
    assert "larger than this client accepts (100000 bytes)" in result.stdout
    assert "registry unreachable" not in result.stdout


async def test_a_full_etcd_is_named_as_such_not_as_a_response_over_the_limit(
    tmp_path: Path,
) -> None:
    """etcd's NOSPACE alarm (its database over --quota-backend-bytes) answers with the
    same gRPC code as a response over our receive limit, and was reported as "a response
    was larger than this client accepts ... remove the oversized ones", which sends the
    operator the wrong way. It is etcd's own message, a RegistryError retried as any."""
    server = EtcdServer(tmp_path / "etcd", extra=("--quota-backend-bytes", "1000000"))
    registry = EtcdRegistry(parse_endpoints(server.endpoint))
    try:
        await asyncio.to_thread(server.start)
        with pytest.raises(RegistryError) as failed:
            for i in range(10):
                await registry.put(f"/full/{i}", b"x" * 900_000, None)
                await asyncio.sleep(0.3)  # etcd measures its size at its next commit
        assert not isinstance(failed.value, RegistryConfigError), failed.value
        assert "database space exceeded" in str(failed.value)
    finally:
        await registry.close()
        server.stop()


# -- item 9: TLS files checked before anything is tried ---------------------------------------


@pytest.fixture(scope="module")
def tls_etcd(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, EtcdServer, dict[str, str], Path]]:
    base = tmp_path_factory.mktemp("tls")
    pki = make_pki(base / "pki")
    # A second key that matches nothing, a file that is no certificate, a directory.
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "other.key"],
        cwd=base / "pki",
        check=True,
        capture_output=True,
    )
    (base / "pki" / "garbage.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    (base / "pki" / "adir").mkdir()
    with etcd_in_netns(base / "etcd", "htls", tls=pki) as (ns, server):
        yield ns, server, pki, base / "pki"


TLS_CASES: list[tuple[str, Callable[[dict[str, str], Path], list[str]], str]] = [
    (
        "missing-ca",
        lambda p, d: ["--etcd-cafile", str(d / "nope.crt")],
        "cannot read etcd CA file {d}/nope.crt: No such file or directory",
    ),
    (
        "ca-is-a-directory",
        lambda p, d: ["--etcd-cafile", str(d / "adir")],
        "cannot read etcd CA file {d}/adir: Is a directory",
    ),
    (
        "ca-is-garbage",
        lambda p, d: ["--etcd-cafile", str(d / "garbage.crt")],
        "etcd CA file {d}/garbage.crt holds no usable certificate",
    ),
    (
        "cert-without-key",
        lambda p, d: ["--etcd-cafile", p["ca"], "--etcd-certfile", p["client_cert"]],
        "--etcd-certfile and --etcd-keyfile go together (--etcd-certfile was given alone)",
    ),
    (
        "key-not-matching",
        lambda p, d: [
            "--etcd-cafile",
            p["ca"],
            "--etcd-certfile",
            p["client_cert"],
            "--etcd-keyfile",
            str(d / "other.key"),
        ],
        "etcd key file {d}/other.key does not match the certificate in {d}/client.crt",
    ),
    (
        "missing-key",
        lambda p, d: [
            "--etcd-cafile",
            p["ca"],
            "--etcd-certfile",
            p["client_cert"],
            "--etcd-keyfile",
            str(d / "gone.key"),
        ],
        "cannot read etcd key file {d}/gone.key: No such file or directory",
    ),
    (
        "cert-is-garbage",
        lambda p, d: [
            "--etcd-cafile",
            p["ca"],
            "--etcd-certfile",
            str(d / "garbage.crt"),
            "--etcd-keyfile",
            p["client_key"],
        ],
        "etcd certificate {d}/garbage.crt or key {d}/client.key is unusable",
    ),
]


@pytest.mark.netns
@pytest.mark.parametrize(
    ("flags", "expected"), [c[1:] for c in TLS_CASES], ids=[c[0] for c in TLS_CASES]
)
def test_bad_tls_files_are_one_line_at_once(
    tls_etcd: tuple[str, EtcdServer, dict[str, str], Path],
    tmp_path: Path,
    flags: Callable[[dict[str, str], Path], list[str]],
    expected: str,
) -> None:
    ns, server, pki, directory = tls_etcd
    before = server.keys("/coreos.com/network/subnets/")
    line, took = refused(
        ns,
        tmp_path,
        "--etcd-endpoints",
        server.endpoint,
        "--network",
        NETWORK,
        *flags(pki, directory),
    )
    assert expected.format(d=directory) in line, line
    assert "registry unreachable" not in line
    assert took < 5.0, f"{took:.1f} s: retried instead of refused"
    assert server.keys("/coreos.com/network/subnets/") == before
    assert not (tmp_path / "subnet.env").exists()


def test_the_tls_checks_themselves() -> None:
    """Without a server: the same checks, as the library raises them."""
    with pytest.raises(RegistryConfigError, match="go together"):
        TlsFiles(keyfile="/k").read()
    with pytest.raises(RegistryConfigError, match="/nonexistent/ca.crt"):
        EtcdRegistry(
            parse_endpoints("https://127.0.0.1:1"), tls=TlsFiles(cafile="/nonexistent/ca.crt")
        )


# -- items 9 and 4: a wrong password fails at once; the right one need not be in ps -----------


@pytest.fixture(scope="module")
def auth_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, EtcdServer]]:
    with etcd_in_netns(tmp_path_factory.mktemp("auth") / "etcd", "haut") as (ns, server):
        server.ctl("user", "add", "root", "--new-user-password", "s3cret-pw")
        server.ctl("auth", "enable")
        yield ns, server


@pytest.mark.netns
def test_a_wrong_password_is_a_configuration_error_not_unreachable(
    auth_etcd: tuple[str, EtcdServer], tmp_path: Path
) -> None:
    ns, server = auth_etcd
    line, took = refused(
        ns,
        tmp_path,
        "--etcd-endpoints",
        server.endpoint,
        "--network",
        NETWORK,
        "--etcd-username",
        "root",
        "--etcd-password",
        "wrong",
    )
    assert f"etcd {server.endpoint}: authentication failed for user 'root'" in line, line
    assert "FLANNELD_ETCD_PASSWORD" in line and "wrong" not in line
    assert took < 5.0


@pytest.mark.netns
def test_the_password_from_the_environment_works_and_is_not_in_ps(
    auth_etcd: tuple[str, EtcdServer], tmp_path: Path
) -> None:
    ns, server = auth_etcd
    daemon = Daemon(
        overlay_run(
            ns,
            tmp_path,
            "--etcd-endpoints",
            server.endpoint,
            "--network",
            NETWORK,
            "--etcd-username",
            "root",
        ),
        tmp_path / "daemon.log",
        env=child_env(FLANNELD_ETCD_PASSWORD="s3cret-pw"),
    )
    try:
        daemon.wait_started(tmp_path / "subnet.env")
        pids = [daemon.proc.pid, *netns_pids(ns)]
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert b"s3cret-pw" not in cmdline
    finally:
        assert daemon.stop() == 0


# -- item 10: one etcd lease per key, across renewals and restarts ----------------------------


def test_renewals_and_restarts_keep_one_etcd_lease(
    lo_etcd: tuple[str, EtcdServer], tmp_path: Path
) -> None:
    """Three starts of a daemon and renewals in between (SubnetManager renews with the
    same KeyValueStore.put): the lease object count does not move, and the key keeps
    its lease."""
    ns, server = lo_etcd
    prefix = f"/ren{uuid.uuid4().hex[:8]}/network"
    server.put(f"{prefix}/config", json.dumps({"Network": NETWORK}))
    before = lease_ids(server)
    owners: list[int] = []
    for run in range(3):
        (tmp_path / "subnet.env").unlink(missing_ok=True)  # the registry's lease brings it back
        daemon = Daemon(
            overlay_run(ns, tmp_path, "--etcd-endpoints", server.endpoint, "--etcd-prefix", prefix),
            tmp_path / f"daemon{run}.log",
        )
        try:
            daemon.wait_started(tmp_path / "subnet.env")
            (key,) = server.keys(f"{prefix}/subnets/")
            owners.append(server.lease_of(key))
        finally:
            assert daemon.stop() == 0
    made = lease_ids(server) - before
    assert len(made) == 1, f"3 starts made {len(made)} etcd leases: {sorted(made)}"
    assert len(set(owners)) == 1 and owners[0] in made


async def test_renewals_refresh_the_same_lease(lo_etcd: tuple[str, EtcdServer]) -> None:
    ns, server = lo_etcd
    prefix = f"/rn{uuid.uuid4().hex[:8]}/network"
    script = f"""
import asyncio, json
from ipaddress import IPv4Address
from control.etcd_endpoints import parse_endpoints
from control.etcd_registry import EtcdRegistry
from control import subnet_manager
from control.subnet_manager import SubnetManager
async def main():
    registry = EtcdRegistry(parse_endpoints({server.endpoint!r}))
    renewed = []
    def note(event, **fields):
        if event == "lease_renewed":
            renewed.append(event)
    m = SubnetManager(registry, public_ip=IPv4Address("192.0.2.7"), prefix={prefix!r},
        ttl=10, renew_margin=9, notify=note)
    await m.kv.put(m.config_key, json.dumps({{"Network": {NETWORK!r}}}).encode(), None)
    lease = await m.acquire(await m.read_config())
    task = asyncio.create_task(m.keep_renewed(lease))
    while len(renewed) < 4:
        await asyncio.sleep(0.1)
    task.cancel()
    print(m.key_of(lease))
    await registry.close()
asyncio.run(main())
"""
    before = lease_ids(server)
    result = await asyncio.to_thread(
        subprocess.run,
        ["ip", "netns", "exec", ns, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    made = lease_ids(server) - before
    assert len(made) == 1, f"4 renewals left {len(made)} new etcd leases"
    owner = server.lease_of(key)
    assert owner in made
    info = server.ctl("lease", "timetolive", f"{owner:x}").stdout
    assert "granted with TTL(10s)" in info, info


def test_a_lease_shared_with_another_key_is_left_alone(lo_etcd: tuple[str, EtcdServer]) -> None:
    """A key on an etcd lease that also holds another key (not one we made alone): a put
    moves our key to a new lease and leaves the old lease and its other key in place."""
    ns, server = lo_etcd
    prefix = f"/shr{uuid.uuid4().hex[:8]}"
    shared = server.grant(3600)
    server.put(f"{prefix}/ours", "v0", lease=shared)
    server.put(f"{prefix}/theirs", "t", lease=shared)
    script = f"""
import asyncio
from control.etcd_endpoints import parse_endpoints
from control.etcd_registry import EtcdRegistry
async def main():
    registry = EtcdRegistry(parse_endpoints({server.endpoint!r}))
    await registry.put({prefix + "/ours"!r}, b"v1", 3600)
    await registry.close()
asyncio.run(main())
"""
    subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script],
        check=True,
        timeout=60,
        env=child_env(),
    )
    assert server.get(f"{prefix}/theirs") == "t"
    assert server.lease_of(f"{prefix}/theirs") == int(shared, 16)
    assert server.lease_of(f"{prefix}/ours") != int(shared, 16)
    assert int(shared, 16) in lease_ids(server)


# -- item 13: after a good reconnect the backoff starts small again ---------------------------


async def test_backoff_resets_after_a_good_reconnect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two outages of a real etcd (killed, restarted). The backoff doubles during the
    first; after the reconnect has held for STABLE seconds the second outage is retried
    from BACKOFF_MIN again (before the fix it stayed at the cap until an event came).
    The cap and STABLE are shortened to keep the test short; the rule is the same."""
    monkeypatch.setattr(subnet_manager, "BACKOFF_MAX", 0.8)
    monkeypatch.setattr(subnet_manager, "STABLE", 1.0)
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    notes: list[tuple[str, dict[str, Any]]] = []
    registry = EtcdRegistry(parse_endpoints(server.endpoint))
    try:
        prefix = "/coreos.com/network"
        m = SubnetManager(
            registry,
            public_ip=IPv4Address("192.0.2.1"),
            prefix=prefix,
            notify=lambda e, **f: notes.append((e, f)),
        )
        await asyncio.to_thread(server.put, f"{prefix}/config", json.dumps({"Network": NETWORK}))
        own = await m.acquire(parse_config(json.dumps({"Network": NETWORK})))
        recorder = Recorder()
        task = start_watch(m, own, recorder)

        def count(event: str) -> int:
            return sum(1 for e, _ in notes if e == event)

        try:
            await wait_until(lambda: len(recorder.snapshots) == 1, 5, "first snapshot")
            for outage in (1, 2):
                await asyncio.to_thread(server.stop)
                await wait_until(lambda n=outage: count("watch_failed") == n, 15, "failure")
                await asyncio.sleep(1.5)  # the backoff doubles up to its cap meanwhile
                await asyncio.to_thread(server.start)
                await wait_until(lambda n=outage: count("watch_recovered") == n, 15, "recovery")
                await asyncio.sleep(1.5)  # up for longer than STABLE: a good reconnect
            failed = [f for e, f in notes if e == "watch_failed"]
            assert [f["retry_in"] for f in failed] == [0.1, 0.1], failed
            assert count("watch_failed") == 2 and count("watch_recovered") == 2
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await registry.close()
        server.stop()
