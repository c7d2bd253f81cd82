"""`overlay run` refuses bad input with one line and a non-zero exit, and leaves nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.commands import fatal_text, overlay_cmd


def _run(
    args: list[str],
    *,
    netns: str | None = None,
    prefix: list[str] | None = None,
    timeout: float = 20,
) -> subprocess.CompletedProcess[str]:
    cmd = overlay_cmd("run", *args)
    if prefix:
        cmd = prefix + cmd
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _one_line(text: str) -> str:
    """The one error line, which must also be the last thing printed (info logs of the
    steps that went well may come before it)."""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line: {text!r}"
    return errors[0]


def test_unknown_flag_is_one_line_usage_error() -> None:
    result = _run(["--no-such-flag"])
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "unrecognized arguments: --no-such-flag" in line


def test_bad_flag_value_is_one_line_usage_error() -> None:
    result = _run(["--network", "10.0.0.300/8"])
    assert result.returncode == 2
    assert "is not an IPv4 CIDR" in _one_line(result.stderr)


def test_bad_backend_choice() -> None:
    result = _run(["--backend", "ipsec"])
    assert result.returncode == 2
    assert "invalid choice: 'ipsec'" in _one_line(result.stderr)


@pytest.mark.netns
def test_bad_network_config_exits_with_field_name(netns, tmp_path: Path) -> None:
    ns = netns("cfg")
    registry = tmp_path / "registry.json"
    from control.file_registry import FileRegistry

    FileRegistry(registry).put_sync(
        "/coreos.com/network/config",
        json.dumps({"Network": "198.18.0.0/16", "SubnetLen": 31}).encode(),
        None,
    )
    result = _run(
        [
            "--registry-file",
            str(registry),
            "--iface",
            "lo",
            "--subnet-file",
            str(tmp_path / "subnet.env"),
            "--status-socket",
            str(tmp_path / "s.sock"),
        ],
        netns=ns,
    )
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert "invalid network config" in line and "SubnetLen" in line
    # Stamped like every other line: time, level, node.
    assert fatal_text(line).startswith("overlay run: error: invalid network config")
    assert line.endswith(" node=127.0.0.1"), line
    # Nothing was leased, nothing written, no TUN left in the namespace.
    assert "subnets" not in registry.read_text()
    assert not (tmp_path / "subnet.env").exists()
    links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True)
    assert "flannel0" not in links.stdout


@pytest.mark.netns
def test_missing_tun_permission(netns, tmp_path: Path) -> None:
    ns = netns("cap")
    # A real missing permission: root without CAP_NET_ADMIN cannot create a TUN device.
    drop = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    result = _run(
        [
            "--registry-file",
            str(tmp_path / "r.json"),
            "--network",
            "198.18.0.0/16",
            "--iface",
            "lo",
            "--subnet-file",
            str(tmp_path / "subnet.env"),
        ],
        netns=ns,
        prefix=drop,
    )
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert "cannot create TUN device flannel0" in line and "CAP_NET_ADMIN" in line
    assert "subnets" not in (tmp_path / "r.json").read_text()  # no lease was taken


@pytest.mark.netns
def test_no_interface_to_choose(netns, tmp_path: Path) -> None:
    ns = netns("nif")
    result = _run(
        [
            "--registry-file",
            str(tmp_path / "r.json"),
            "--network",
            "198.18.0.0/16",
            "--iface",
            "eth9",
        ],
        netns=ns,
    )
    assert result.returncode == 1
    assert "no interface with an address matches --iface eth9" in _one_line(result.stderr)


def test_env_var_sets_flag() -> None:
    import os

    env = dict(os.environ, FLANNELD_SUBNET_LEASE_RENEW_MARGIN="abc")
    result = subprocess.run(overlay_cmd("run"), capture_output=True, text=True, env=env, timeout=20)
    assert result.returncode == 2
    assert "is not a number of minutes" in _one_line(result.stderr)


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "0 workers: must be 1 to 256"), ("257", "must be 1 to 256"), ("two", "'two' is not")],
)
def test_bad_workers_value(value: str, message: str) -> None:
    result = _run(["--workers", value])
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "argument --workers" in line and message in line


def test_bad_workers_env_var() -> None:
    import os

    env = dict(os.environ, FLANNELD_WORKERS="-1")
    result = subprocess.run(overlay_cmd("run"), capture_output=True, text=True, env=env, timeout=20)
    assert result.returncode == 2
    assert "-1 workers: must be 1 to 256" in _one_line(result.stderr)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "-1 us: must be 0 to 10000"),
        ("10001", "must be 0 to 10000"),
        ("fast", "'fast' is not a number of microseconds"),
    ],
)
def test_bad_busy_poll_value(value: str, message: str) -> None:
    result = _run(["--busy-poll-us", value])
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "argument --busy-poll-us" in line and message in line


@pytest.mark.netns
@pytest.mark.parametrize(
    ("backend", "extra", "datapath"),
    [("host-gw", [], "host-gw"), ("vxlan", ["--kernel-vxlan"], "vxlan (kernel datapath)")],
)
@pytest.mark.parametrize(
    ("flag", "advice"),
    [(["--workers", "2"], "use --workers 1"), (["--busy-poll-us", "100"], "leave it at 0")],
)
def test_userspace_options_with_a_kernel_datapath(
    netns,
    tmp_path: Path,
    backend: str,
    extra: list[str],
    datapath: str,
    flag: list[str],
    advice: str,
) -> None:
    ns = netns("wk")
    result = _run(
        [
            "--registry-file",
            str(tmp_path / "r.json"),
            "--network",
            "198.18.0.0/16",
            "--backend",
            backend,
            *extra,
            "--iface",
            "lo",
            "--subnet-file",
            str(tmp_path / "subnet.env"),
            "--status-socket",
            str(tmp_path / "s.sock"),
            *flag,
        ],
        netns=ns,
    )
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert f"{' '.join(flag)} needs a userspace datapath" in line and datapath in line
    assert advice in line
    # Refused before anything was made: no lease, no subnet.env, no device.
    assert "subnets" not in (tmp_path / "r.json").read_text()
    assert not (tmp_path / "subnet.env").exists()
    links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True)
    assert "flannel" not in links.stdout
