"""``overlay-cni``: the CNI plugin, a drop-in for flannel's.

Like flannel's plugin it does no networking itself: it reads the lease the daemon wrote to
``subnet.env``, renders a config for the real ``bridge`` plugin (with ``host-local`` IPAM
handing out addresses from the lease), saves that config per container so DEL still works
after the daemon and its ``subnet.env`` are gone, and execs the delegate with the same
environment. Results and errors follow the CNI spec: JSON on stdout, exit code non-zero on
error.

A node that switches from flannel's plugin keeps working: DEL and CHECK also find the
delegate config flannel's plugin saved (``/var/lib/cni/flannel/<container id>``), so a pod
added by flannel is deleted cleanly (its address released). CNI spec 1.1.0 is spoken:
STATUS (ready when the daemon's subnet.env is there) and GC (a saved attachment the runtime
no longer lists is deleted through its delegate); a delegate that only speaks 1.0.0
(Debian's bridge) is called with 1.0.0, whose results 1.1.0 only extends.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from control.atomic_file import write_atomic
from control.subnet_env import SubnetEnv, SubnetEnvError, parse_subnet_env

SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_DATA_DIR = "/var/lib/cni/overlay"
FLANNEL_DATA_DIR = "/var/lib/cni/flannel"  # where flannel's own plugin saves delegate configs
DEFAULT_IPAM_DATA_DIR = "/var/lib/cni/networks"
DEFAULT_BRIDGE = "cni0"
DELEGATE_TIMEOUT = 120.0

# Well-known CNI error codes (spec "Error" section).
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN_LATER = 11
ERR_PLUGIN_NOT_AVAILABLE = 50  # spec 1.1.0, STATUS: cannot service ADD requests
GC_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")  # libcni sends both

# The spec's restriction on container ids; it also keeps them safe as file names.
_CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")


class CniError(Exception):
    """An error to report the CNI way: a code, a one-line message and details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }


class DelegateFailed(Exception):
    """The delegate plugin failed; its stdout (usually its own error JSON) is passed on."""

    def __init__(self, returncode: int, stdout: str) -> None:
        super().__init__(f"delegate exited with {returncode}")
        self.returncode = returncode
        self.stdout = stdout


# -- config ------------------------------------------------------------------------------


def parse_netconf(stdin: str) -> dict[str, Any]:
    """Decode and validate the network config the runtime gave us on stdin."""
    try:
        conf = json.loads(stdin)
    except ValueError as e:
        raise CniError(ERR_DECODE, "network config on stdin is not valid JSON", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(ERR_DECODE, "network config on stdin must be a JSON object")
    version = conf.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CniError(ERR_INVALID_CONFIG, 'network config: "cniVersion" is missing')
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ERR_INCOMPATIBLE_VERSION,
            f"incompatible CNI version {version!r}",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    name = conf.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(ERR_INVALID_CONFIG, 'network config: "name" is missing')
    versions = conf.get("cniVersions")
    if versions is not None and not (
        isinstance(versions, list) and all(isinstance(v, str) for v in versions)
    ):
        raise CniError(ERR_INVALID_CONFIG, 'network config: "cniVersions" must be a list')
    for key in ("subnetFile", "dataDir", "ipamDataDir", "flannelDataDir"):
        if key in conf and (not isinstance(conf[key], str) or not conf[key]):
            raise CniError(ERR_INVALID_CONFIG, f'network config: "{key}" must be a path')
    for key in ("delegate", "ipam"):
        if key in conf and not isinstance(conf[key], dict):
            raise CniError(ERR_INVALID_CONFIG, f'network config: "{key}" must be an object')
    for key in ("name", "ipam"):
        if key in conf.get("delegate", {}):
            raise CniError(
                ERR_INVALID_CONFIG,
                f'network config: "delegate" must not have "{key}", it is set by overlay-cni',
            )
    delegate_type = conf.get("delegate", {}).get("type", "bridge")
    if not isinstance(delegate_type, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", delegate_type):
        raise CniError(ERR_INVALID_CONFIG, f'network config: delegate "type" {delegate_type!r}')
    return conf


def load_subnet_env(path: str) -> SubnetEnv:
    """The lease the daemon wrote; missing means the daemon is not (yet) up: try later."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise CniError(
            ERR_TRY_AGAIN_LATER,
            f"subnet.env not found at {path}: is overlay run up on this node?",
        ) from None
    except OSError as e:
        raise CniError(ERR_IO, f"cannot read {path}: {e.strerror}") from None
    try:
        return parse_subnet_env(text)
    except SubnetEnvError as e:
        raise CniError(ERR_INVALID_CONFIG, f"{path}: {e}") from None


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base`` (objects merge, the rest replaces)."""
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_delegate(conf: Mapping[str, Any], env: SubnetEnv) -> dict[str, Any]:
    """The bridge plugin config flannel would render for this lease.

    Defaults mirror flannel's plugin: masquerade in the bridge plugin only when the daemon
    does not (``FLANNEL_IPMASQ``), the lease MTU, the node as gateway, host-local IPAM over
    the lease with a route to the whole overlay network; with a dual-stack subnet.env, a
    second range (the IPv6 lease) and route (the IPv6 network), as flannel's plugin adds
    them; with an IPv6-only one, those alone. ``delegate`` keys override the plugin
    defaults; a top-level ``ipam`` object may add IPAM keys and extra routes, but the
    ranges always come from the lease (as in flannel).
    """
    user_ipam = dict(conf.get("ipam", {}))
    extra_routes = user_ipam.pop("routes", [])
    if not isinstance(extra_routes, list):
        raise CniError(ERR_INVALID_CONFIG, 'network config: "ipam.routes" must be a list')
    ipam: dict[str, Any] = {
        "type": "host-local",
        "dataDir": conf.get("ipamDataDir", DEFAULT_IPAM_DATA_DIR),
    }
    ipam = _merge(ipam, user_ipam)
    ipam["ranges"] = []
    ipam["routes"] = copy.deepcopy(extra_routes)
    if env.subnet is not None and env.network is not None:  # None: IPv6 only
        ipam["ranges"].append([{"subnet": str(env.subnet.network)}])
        ipam["routes"].append({"dst": str(env.network)})
    if env.ipv6_subnet is not None and env.ipv6_network is not None:
        ipam["ranges"].append([{"subnet": str(env.ipv6_subnet.network)}])
        ipam["routes"].append({"dst": str(env.ipv6_network)})
    overrides = conf.get("delegate", {})
    delegate: dict[str, Any] = {"cniVersion": conf["cniVersion"], "name": conf["name"]}
    delegate["type"] = overrides.get("type", "bridge")
    if delegate["type"] == "bridge":
        delegate.update(bridge=DEFAULT_BRIDGE, isGateway=True)
    delegate.update(ipMasq=not env.ip_masq, mtu=env.mtu)
    delegate = _merge(delegate, overrides)
    delegate["cniVersion"] = conf["cniVersion"]  # as flannel: the runtime's version wins
    delegate["ipam"] = ipam
    if "runtimeConfig" in conf:
        delegate["runtimeConfig"] = copy.deepcopy(conf["runtimeConfig"])
    return delegate


# -- saved delegate configs --------------------------------------------------------------


def _saved_path(conf: Mapping[str, Any], container_id: str) -> Path:
    return Path(conf.get("dataDir", DEFAULT_DATA_DIR)) / container_id


def _data_dirs(conf: Mapping[str, Any]) -> list[Path]:
    """Ours, then flannel's plugin's (``flannelDataDir``), where DEL and GC look."""
    ours = Path(conf.get("dataDir", DEFAULT_DATA_DIR))
    flannel = Path(conf.get("flannelDataDir", FLANNEL_DATA_DIR))
    return [ours] if flannel == ours else [ours, flannel]


def _find_saved(conf: Mapping[str, Any], container_id: str) -> Path | None:
    """The delegate config saved by ADD, ours or flannel's plugin's; None if neither."""
    for directory in _data_dirs(conf):
        path = directory / container_id
        if path.exists():
            return path
    return None


def save_delegate(path: Path, delegate: Mapping[str, Any]) -> None:
    """Write atomically (0600, like flannel) so a crash never leaves a half config."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, json.dumps(delegate), 0o600)
    except OSError as e:
        raise CniError(ERR_IO, f"cannot save delegate config {path}: {e.strerror}") from None


def load_delegate(path: Path) -> dict[str, Any] | None:
    """The config ADD used, or None when there is none (never added, or already deleted)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CniError(ERR_IO, f"cannot read saved delegate config {path}: {e.strerror}") from None
    except ValueError:
        raise CniError(ERR_DECODE, f"saved delegate config {path} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise CniError(ERR_DECODE, f"saved delegate config {path} is not a plugin config")
    return data


# -- delegate execution ------------------------------------------------------------------


def find_plugin(plugin_type: str, cni_path: str) -> Path:
    for directory in cni_path.split(os.pathsep):
        if directory:
            candidate = Path(directory) / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    raise CniError(
        ERR_INVALID_ENV,
        f"plugin {plugin_type!r} not found in CNI_PATH {cni_path!r}",
        "install containernetworking-plugins or point CNI_PATH at its directory",
    )


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def delegate_versions(plugin_type: str, environ: Mapping[str, str]) -> list[str]:
    """The CNI versions a delegate plugin speaks (its VERSION answer; [] if it gives none)."""
    proc = run_delegate("VERSION", {"type": plugin_type, "cniVersion": "0.4.0"}, environ)
    try:
        versions = json.loads(proc.stdout).get("supportedVersions", [])
    except (ValueError, AttributeError):
        return []
    return [v for v in versions if isinstance(v, str)]


def negotiate(delegate: dict[str, Any], environ: Mapping[str, str]) -> str:
    """Lower a 1.1.0 delegate config to 1.0.0 for a delegate that does not speak 1.1.0
    (1.1.0 only adds commands and optional result fields); the version asked for."""
    asked = str(delegate.get("cniVersion", ""))
    if asked == "1.1.0" and "1.1.0" not in delegate_versions(str(delegate["type"]), environ):
        delegate["cniVersion"] = "1.0.0"
        prev = delegate.get("prevResult")
        if isinstance(prev, dict) and prev.get("cniVersion") == "1.1.0":
            delegate["prevResult"] = {**prev, "cniVersion": "1.0.0"}
    return asked


def _as_version(stdout: str, asked: str, used: str) -> str:
    """A delegate's result in the version the runtime asked for (1.0.0 -> 1.1.0)."""
    if asked == used or not stdout.strip():
        return stdout
    try:
        result = json.loads(stdout)
    except ValueError:
        return stdout
    if isinstance(result, dict) and result.get("cniVersion") == used:
        result["cniVersion"] = asked
    return json.dumps(result)


def run_delegate(
    command: str, delegate: Mapping[str, Any], environ: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    """Exec the delegate with our environment (CNI_COMMAND overridden) and its config."""
    plugin = find_plugin(str(delegate["type"]), environ.get("CNI_PATH", ""))
    env = dict(environ)
    env["CNI_COMMAND"] = command
    try:
        return subprocess.run(
            [str(plugin)],
            input=json.dumps(delegate),
            env=env,
            capture_output=True,
            text=True,
            timeout=DELEGATE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CniError(
            ERR_TRY_AGAIN_LATER,
            f"delegate {plugin} {command} timed out after {DELEGATE_TIMEOUT:.0f} s",
        ) from None
    except OSError as e:
        raise CniError(ERR_IO, f"cannot exec delegate {plugin}: {e.strerror}") from None


def _delegate_or_fail(
    command: str, delegate: Mapping[str, Any], environ: Mapping[str, str]
) -> subprocess.CompletedProcess[str]:
    proc = run_delegate(command, delegate, environ)
    if proc.stderr:
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        if proc.stdout.strip():
            raise DelegateFailed(proc.returncode, proc.stdout)
        raise CniError(
            ERR_IO,
            f"delegate {delegate['type']} {command} failed with exit code {proc.returncode}",
            proc.stderr.strip()[-1000:],
        )
    return proc


# -- commands ----------------------------------------------------------------------------


def _require(environ: Mapping[str, str], *names: str) -> None:
    missing = [name for name in names if not environ.get(name)]
    if missing:
        raise CniError(ERR_INVALID_ENV, f"required environment variables missing: {missing}")
    container_id = environ.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID.match(container_id):
        raise CniError(ERR_INVALID_ENV, f"CNI_CONTAINERID {container_id!r} is not a valid id")


def cmd_add(conf: dict[str, Any], environ: Mapping[str, str]) -> str:
    _require(environ, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
    env = load_subnet_env(conf.get("subnetFile", DEFAULT_SUBNET_FILE))
    delegate = build_delegate(conf, env)
    asked = negotiate(delegate, environ)
    # Saved before the delegate runs: a failed ADD is followed by a DEL that needs it.
    save_delegate(_saved_path(conf, environ["CNI_CONTAINERID"]), delegate)
    out = _delegate_or_fail("ADD", delegate, environ).stdout
    return _as_version(out, asked, str(delegate["cniVersion"]))


def _delete(path: Path, conf: Mapping[str, Any], environ: Mapping[str, str]) -> None:
    """DEL through the delegate config saved at ``path``, then forget it."""
    delegate = load_delegate(path)
    if delegate is None:
        return  # nothing was added, or DEL already ran: the spec says succeed
    prev = conf.get("prevResult")
    if isinstance(prev, dict):
        ours, theirs = str(delegate.get("cniVersion")), str(conf.get("cniVersion"))
        if ours == theirs:
            delegate["prevResult"] = prev
        elif (ours, theirs) == ("1.0.0", "1.1.0"):  # negotiated down at ADD: same shape
            delegate["prevResult"] = {**prev, "cniVersion": ours}
        # else (a config flannel's plugin saved in its own version): DEL without it, as
        # flannel's plugin does; the spec has DEL clean up without prevResult too.
    _delegate_or_fail("DEL", delegate, environ)
    # Removed only after the delegate succeeded, so a retried DEL can still clean up.
    path.unlink(missing_ok=True)


def cmd_del(conf: dict[str, Any], environ: Mapping[str, str]) -> str:
    _require(environ, "CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH")
    path = _find_saved(conf, environ["CNI_CONTAINERID"])
    if path is not None:
        _delete(path, conf, environ)
    return ""


def cmd_status(conf: dict[str, Any], environ: Mapping[str, str]) -> str:
    """Ready when the daemon's subnet.env is there (and the delegate, if it speaks 1.1.0,
    says it is ready too)."""
    try:
        env = load_subnet_env(conf.get("subnetFile", DEFAULT_SUBNET_FILE))
    except CniError as e:
        raise CniError(ERR_PLUGIN_NOT_AVAILABLE, e.msg, e.details) from None
    if environ.get("CNI_PATH"):
        delegate = build_delegate(conf, env)
        if "1.1.0" in delegate_versions(str(delegate["type"]), environ):
            _delegate_or_fail("STATUS", delegate, environ)
    return ""


def cmd_gc(conf: dict[str, Any], environ: Mapping[str, str]) -> str:
    """Delete every saved attachment of this network the runtime does not list as valid
    (ours and flannel's plugin's), through its delegate, so its address is released."""
    _require(environ, "CNI_PATH")
    listed: Any = next((conf[key] for key in GC_KEYS if key in conf), [])
    if not isinstance(listed, list):
        raise CniError(ERR_INVALID_CONFIG, f'network config: "{GC_KEYS[0]}" must be a list')
    valid = {str(a.get("containerID")) for a in listed if isinstance(a, dict)}
    failed: list[str] = []
    for directory in _data_dirs(conf):
        try:
            saved = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CniError(ERR_IO, f"cannot list {directory}: {e.strerror}") from None
        for path in saved:
            if path.name in valid or not _CONTAINER_ID.match(path.name):
                continue
            try:
                delegate = load_delegate(path)
                if delegate is None or delegate.get("name") != conf["name"]:
                    continue  # another network's attachment
                # The saved config names no interface; CNI_IFNAME is the runtime's default.
                env = {**environ, "CNI_CONTAINERID": path.name}
                env.setdefault("CNI_IFNAME", "eth0")
                env.pop("CNI_NETNS", None)
                _delete(path, {}, env)
            except (CniError, DelegateFailed) as e:
                failed.append(f"{path.name}: {e}")
    if failed:
        raise CniError(
            ERR_IO, f"GC could not delete {len(failed)} attachment(s)", "; ".join(failed)
        )
    return ""


def with_route_gateways(result: Any) -> Any:
    """prevResult with the gateway filled into IPv4 routes that name none.

    host-local returns the network route without ``gw``; the bridge plugin installs it via
    the gateway, and bridge CHECK before containernetworking/plugins 1.3 (PR #887; Debian
    ships 1.1.1) then looks for a gateway-less route and fails. Naming the gateway the
    route really uses makes CHECK verify what ADD did on every plugin version.
    """
    if not isinstance(result, dict):
        return result
    gateways = {
        ip.get("gateway")
        for ip in result.get("ips", [])
        if isinstance(ip, dict) and ":" not in str(ip.get("address", ":"))
    }
    gateways.discard(None)
    if len(gateways) != 1 or not isinstance(result.get("routes"), list):
        return result
    (gateway,) = gateways
    fixed = copy.deepcopy(result)
    for route in fixed["routes"]:
        if isinstance(route, dict) and not route.get("gw") and ":" not in str(route.get("dst")):
            route["gw"] = gateway
    return fixed


def cmd_check(conf: dict[str, Any], environ: Mapping[str, str]) -> str:
    _require(environ, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH")
    path = _find_saved(conf, environ["CNI_CONTAINERID"])
    delegate = load_delegate(path) if path is not None else None
    if delegate is None:
        delegate = build_delegate(
            conf, load_subnet_env(conf.get("subnetFile", DEFAULT_SUBNET_FILE))
        )
        negotiate(delegate, environ)
    if "prevResult" in conf:
        prev = with_route_gateways(conf["prevResult"])
        if isinstance(prev, dict) and prev.get("cniVersion") != delegate.get("cniVersion"):
            prev = {**prev, "cniVersion": delegate["cniVersion"]}
        delegate["prevResult"] = prev
    _delegate_or_fail("CHECK", delegate, environ)
    return ""


def version_info() -> dict[str, Any]:
    return {"cniVersion": SUPPORTED_VERSIONS[-1], "supportedVersions": list(SUPPORTED_VERSIONS)}


def _error_version(stdin: str) -> str:
    """Answer errors in the version the runtime asked for, when we speak it."""
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, AttributeError):
        return SUPPORTED_VERSIONS[-1]
    return version if version in SUPPORTED_VERSIONS else SUPPORTED_VERSIONS[-1]


COMMANDS = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
}


def run(environ: Mapping[str, str], stdin: str) -> tuple[int, str]:
    """Run one CNI invocation; returns (exit code, stdout). Pure enough to unit-test."""
    command = environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, json.dumps(version_info())
    try:
        handler = COMMANDS.get(command)
        if handler is None:
            raise CniError(
                ERR_INVALID_ENV,
                f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}, VERSION",
            )
        return 0, handler(parse_netconf(stdin), environ)
    except DelegateFailed as e:
        return e.returncode, e.stdout
    except CniError as e:
        return 1, json.dumps(e.to_json(_error_version(stdin)))


def main() -> int:
    if os.environ.get("CNI_COMMAND") == "VERSION":
        stdin = ""  # VERSION needs no config; do not block on a terminal
    else:
        try:
            stdin = sys.stdin.read()
        except (OSError, UnicodeDecodeError) as e:
            error = CniError(ERR_DECODE, "cannot read the network config from stdin", str(e))
            print(json.dumps(error.to_json(SUPPORTED_VERSIONS[-1])))
            return 1
    code, out = run(os.environ, stdin)
    if out:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
