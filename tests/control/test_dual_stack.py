"""IPv6 and dual stack in the control plane, in flanneld's formats: the config keys with
its defaults and rules, lease keys and values byte for byte as flanneld writes them, the
lease rules for the IPv6 half, subnet.env, and acquisition of both subnets on both
registries (the embedded file registry and a real etcd)."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.allocation import CANDIDATES, free_ipv6_subnets
from control.config import ConfigError, parse_config
from control.etcd_endpoints import parse_endpoints
from control.etcd_registry import EtcdRegistry
from control.file_registry import FileRegistry
from control.kv import KeyValueStore
from control.lease import NO_IPV4, Lease, LeaseError, parse_lease, parse_subnet_key, subnet_key
from control.lease_rules import LeaseBook, Record, lease_problem
from control.subnet_env import SubnetEnv, SubnetEnvError, parse_subnet_env
from control.subnet_manager import NetworkFull, SubnetManager
from tests.helpers.etcd_server import EtcdServer

DUAL = {
    "Network": "10.5.0.0/16",
    "EnableIPv6": True,
    "IPv6Network": "fd00:10::/56",
    "Backend": {"Type": "vxlan"},
}
V6_ONLY = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:10::/56"}
MAC4 = "0e:6f:8d:21:4c:01"
MAC6 = "5a:2c:91:0b:7e:02"

# What flanneld v0.20.2 writes (Go's encoding/json of LeaseAttrs: PublicIP, PublicIPv6,
# then BackendType, BackendData, BackendV6Data with omitempty; vxlanLeaseAttrs is
# {"VNI","VtepMAC"}), for a dual-stack vxlan node, an IPv6-only vxlan node (Go's zero
# IP4Net keys it 0.0.0.0-0, its zero IP4 is "0.0.0.0", no BackendData) and a dual-stack
# host-gw node.
FLANNELD_RECORDS = [
    (
        "10.5.52.0-24&fd00:10:0:34::-64",
        '{"PublicIP":"192.0.2.3","PublicIPv6":"2001:db8::3","BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{MAC4}"}},'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{MAC6}"}}}}',
    ),
    (
        "0.0.0.0-0&fd00:10:0:34::-64",
        '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::3","BackendType":"vxlan",'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{MAC6}"}}}}',
    ),
    (
        "10.5.52.0-24&fd00:10:0:34::-64",
        '{"PublicIP":"192.0.2.3","PublicIPv6":"2001:db8::3","BackendType":"host-gw"}',
    ),
]


# -- config -----------------------------------------------------------------------------------


def test_dual_stack_config_has_flanneld_defaults() -> None:
    config = parse_config(DUAL)
    assert config.enable_ipv4 and config.network == IPv4Network("10.5.0.0/16")
    ipv6 = config.ipv6
    assert ipv6 is not None
    assert ipv6.network == IPv6Network("fd00:10::/56")
    assert ipv6.subnet_len == 64  # flanneld: a /64 per node when the network is /62 or larger
    assert ipv6.subnet_min == IPv6Network("fd00:10:0:1::/64")  # the first is skipped
    assert ipv6.subnet_max == IPv6Network("fd00:10:0:ff::/64")
    assert config.warnings == ()


@pytest.mark.parametrize(
    ("network", "subnet_len"),
    [("fd00::/62", 64), ("fd00::/64", 66), ("2001:db8::/120", 122), ("fd00::/124", 126)],
)
def test_ipv6_subnet_len_default(network: str, subnet_len: int) -> None:
    ipv6 = parse_config({**DUAL, "IPv6Network": network}).ipv6
    assert ipv6 is not None and ipv6.subnet_len == subnet_len


def test_ipv6_min_max_and_len_as_given() -> None:
    ipv6 = parse_config(
        {
            **DUAL,
            "IPv6SubnetLen": 80,
            "IPv6SubnetMin": "fd00:10::1:0:0:0",
            "IPv6SubnetMax": "fd00:10::5:0:0:0",
        }
    ).ipv6
    assert ipv6 is not None
    assert (ipv6.subnet_len, ipv6.subnet_min, ipv6.subnet_max) == (
        80,
        IPv6Network("fd00:10::1:0:0:0/80"),
        IPv6Network("fd00:10::5:0:0:0/80"),
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"IPv6Network": ""}, "IPv6Network: missing with EnableIPv6"),
        ({"IPv6Network": None}, "IPv6Network: missing with EnableIPv6"),
        ({"IPv6Network": "10.0.0.0/8"}, "IPv6Network: '10.0.0.0/8' is not an IPv6 CIDR"),
        ({"IPv6Network": "fd00::/125"}, "IPv6Network: fd00::/125 is smaller than /124"),
        ({"IPv6Network": "fe80::/64"}, "is not a unique local (fc00::/7) or global unicast"),
        ({"IPv6Network": "ff00::/8"}, "is not a unique local"),
        ({"IPv6Network": "::/0"}, "is not a unique local"),
        ({"IPv6Network": "::ffff:0:0/96"}, "is not a unique local"),
        ({"IPv6SubnetLen": 127}, "IPv6SubnetLen: 127 is larger than 126"),
        ({"IPv6SubnetLen": 57}, "IPv6SubnetLen: 57 is smaller than the network prefix + 2"),
        ({"IPv6SubnetLen": "64"}, "IPv6SubnetLen: '64' is not an integer"),
        ({"IPv6SubnetMin": "fd00:11::"}, "IPv6SubnetMin: fd00:11:: is outside IPv6Network"),
        ({"IPv6SubnetMax": "fd00:10::1"}, "IPv6SubnetMax: fd00:10::1 is not on a /64 subnet"),
        ({"IPv6SubnetMin": "x"}, "IPv6SubnetMin: 'x' is not an IPv6 address"),
        (
            {"IPv6SubnetMin": "fd00:10:0:9::", "IPv6SubnetMax": "fd00:10:0:8::"},
            "IPv6SubnetMin: fd00:10:0:9::/64 is above IPv6SubnetMax",
        ),
        ({"EnableIPv6": "true"}, "EnableIPv6: 'true' is not true or false"),
        ({"EnableIPv4": False, "EnableIPv6": False}, "EnableIPv4 and EnableIPv6 are both false"),
    ],
)
def test_bad_ipv6_config_is_one_clear_line(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**DUAL, **extra})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_ipv6_only_config_leaves_ipv4_at_flanneld_zero_values() -> None:
    config = parse_config(V6_ONLY)  # no Network at all: flanneld does not read it
    assert not config.enable_ipv4 and config.network == NO_IPV4 and config.subnet_len == 0
    assert config.ipv6 is not None and config.ipv6.subnet_len == 64
    # A Network given anyway is not validated, as flanneld skips the IPv4 half.
    assert parse_config({**V6_ONLY, "Network": "127.0.0.0/8"}).network == NO_IPV4


def test_ipv6_keys_without_enable_ipv6_are_warned_about_not_errors() -> None:
    config = parse_config({"Network": "10.5.0.0/16", "IPv6Network": "fe80::/64"})
    assert config.ipv6 is None
    assert config.warnings == ("IPv6Network: ignored without EnableIPv6, as flanneld does",)


# -- lease keys and values --------------------------------------------------------------------


@pytest.mark.parametrize(("key", "value"), FLANNELD_RECORDS)
def test_flanneld_records_round_trip_byte_for_byte(key: str, value: str) -> None:
    lease = parse_lease(f"/coreos.com/network/subnets/{key}", value)
    assert lease.key == key
    assert lease.value_json() == value


def test_dual_stack_lease_fields() -> None:
    key, value = FLANNELD_RECORDS[0]
    lease = parse_lease(key, value)
    assert lease.subnet == IPv4Network("10.5.52.0/24")
    assert lease.ipv6_subnet == IPv6Network("fd00:10:0:34::/64")
    assert lease.public_ipv6 == IPv6Address("2001:db8::3")
    assert lease.backend_data == {"VNI": 1, "VtepMAC": MAC4}
    assert lease.backend_v6_data == {"VNI": 1, "VtepMAC": MAC6}


def test_ipv6_only_key_as_flanneld_makes_it() -> None:
    assert subnet_key(NO_IPV4, IPv6Network("fd00:10:0:34::/64")) == "0.0.0.0-0&fd00:10:0:34::-64"
    assert parse_subnet_key("0.0.0.0-0&fd00:10:0:34::-64") == (
        NO_IPV4,
        IPv6Network("fd00:10:0:34::/64"),
    )


@pytest.mark.parametrize(
    "value",
    [
        '{"PublicIP":"192.0.2.3","PublicIPv6":"fd00::zz"}',
        '{"PublicIP":"192.0.2.3","PublicIPv6":""}',
        '{"PublicIP":"192.0.2.3","PublicIPv6":7}',
        '{"PublicIP":"192.0.2.3","PublicIPv6":"192.0.2.3"}',
        '{"PublicIP":"192.0.2.3","BackendV6Data":[1]}',
        '{"PublicIP":"192.0.2.3","BackendV6Data":"x"}',
    ],
)
def test_broken_ipv6_values_are_lease_errors(value: str) -> None:
    with pytest.raises(LeaseError):
        parse_lease("10.5.52.0-24&fd00:10:0:34::-64", value)


@pytest.mark.parametrize(
    "key",
    ["10.5.52.0-24&fd00:10:0:34::1-64", "10.5.52.0-24&fd00::-129", "10.5.52.0-24&zz::-64"],
)
def test_broken_ipv6_key_parts_are_lease_errors(key: str) -> None:
    with pytest.raises(LeaseError):
        parse_subnet_key(key)


# -- lease rules for the IPv6 half ------------------------------------------------------------

DUAL_CONFIG = parse_config(DUAL)
OWN_IP, OWN_IPV6 = IPv4Address("192.0.2.1"), IPv6Address("2001:db8::1")


def v6_record(key: str, public_ipv6: str | None, revision: int, public_ip: str = "") -> Record:
    value = {"PublicIP": public_ip or f"192.0.2.{revision}", "PublicIPv6": public_ipv6}
    return Record(key, json.dumps(value).encode(), True, revision)


@pytest.mark.parametrize(
    ("key", "public_ipv6", "reason"),
    [
        ("10.5.3.0-24&fd00:11::-64", "2001:db8::3", "outside IPv6Network fd00:10::/56"),
        ("10.5.3.0-24&fd00:10:0:3::-80", "2001:db8::3", "is not a /64 (IPv6SubnetLen)"),
        ("10.5.3.0-24&fd00:10:0:3::-64", None, "has no PublicIPv6"),
        ("10.5.3.0-24&fd00:10:0:3::-64", "ff02::1", "not a unique local or global unicast"),
        ("10.5.3.0-24&fd00:10:0:3::-64", "fe80::3", "not a unique local or global unicast"),
        ("10.5.3.0-24&fd00:10:0:3::-64", "::1", "not a unique local or global unicast"),
        ("10.5.3.0-24&fd00:10:0:3::-64", str(OWN_IPV6), "is this node's own"),
        ("10.5.3.0-24&FD00:10:0:3::-64", "2001:db8::3", "not written as flanneld writes it"),
        ("10.5.3.0-24&fd00:10:0:3:0::-64", "2001:db8::3", "not written as flanneld writes it"),
    ],
)
def test_invalid_ipv6_halves_are_rejected(key: str, public_ipv6: str | None, reason: str) -> None:
    book = LeaseBook(DUAL_CONFIG, own_ip=OWN_IP, own_ipv6=OWN_IPV6)
    changed, _ = book.put(v6_record(key, public_ipv6, 3))
    assert changed == [] and book.valid() == []
    (rejection,) = book.take_rejections()
    assert reason in rejection.reason


def test_a_lease_without_an_ipv6_part_is_an_ipv4_peer_in_a_dual_stack_network() -> None:
    book = LeaseBook(DUAL_CONFIG, own_ip=OWN_IP, own_ipv6=OWN_IPV6)
    book.put(v6_record("10.5.3.0-24", None, 3))
    (lease,) = book.valid()
    assert lease.ipv6_subnet is None and book.take_rejections() == []


def test_older_ipv6_subnet_wins_an_overlap_and_ours_is_never_shared() -> None:
    own_key = "/p/subnets/10.5.1.0-24&fd00:10:0:1::-64"
    book = LeaseBook(DUAL_CONFIG, own_key=own_key, own_ip=OWN_IP, own_ipv6=OWN_IPV6)
    book.put(v6_record(own_key, str(OWN_IPV6), 1, public_ip=str(OWN_IP)))
    book.put(v6_record("/p/subnets/10.5.4.0-24&fd00:10:0:4::-64", "2001:db8::4", 4))
    book.put(v6_record("/p/subnets/10.5.5.0-24&fd00:10:0:4::-64", "2001:db8::5", 5))
    book.put(v6_record("/p/subnets/10.5.6.0-24&fd00:10:0:1::-64", "2001:db8::6", 6))
    assert [lease.public_ipv6 for lease in book.valid()] == [IPv6Address("2001:db8::4")]
    reasons = sorted(r.reason for r in book.take_rejections())
    assert "overlaps an older lease" in reasons[0]
    assert "overlaps this node's 10.5.1.0/24 fd00:10:0:1::/64" in reasons[1]


def test_ipv6_only_rules() -> None:
    config = parse_config(V6_ONLY)
    book = LeaseBook(config, own_ipv6=OWN_IPV6)
    zero = {"PublicIP": "0.0.0.0"}
    book.put(
        Record(
            "0.0.0.0-0&fd00:10:0:3::-64",
            json.dumps({**zero, "PublicIPv6": "fd01::3"}).encode(),
            True,
            3,
        )
    )
    book.put(
        Record(
            "0.0.0.0-0&fd00:10:0:4::-64",
            json.dumps({**zero, "PublicIPv6": "fd01::4"}).encode(),
            True,
            4,
        )
    )
    book.put(
        Record(
            "10.5.5.0-24&fd00:10:0:5::-64",
            json.dumps({**zero, "PublicIPv6": "fd01::5"}).encode(),
            True,
            5,
        )
    )
    book.put(Record("0.0.0.0-0", json.dumps(zero).encode(), True, 6))
    # Two IPv6-only leases both carry 0.0.0.0-0: they do not overlap each other.
    assert [lease.public_ipv6 for lease in book.valid()] == [
        IPv6Address("fd01::3"),
        IPv6Address("fd01::4"),
    ]
    reasons = sorted(r.reason for r in book.take_rejections())
    assert any("no IPv6 subnet in an IPv6-only network" in r for r in reasons)
    assert any("EnableIPv4 is false" in r for r in reasons)
    lease = Lease(NO_IPV4, IPv4Address(0), ipv6_subnet=IPv6Network("fd00:10:0:3::/64"))
    assert "has no PublicIPv6" in (lease_problem(lease, config) or "")


_key_part = st.text(alphabet="0123456789abcdefABCDEF:.-&/x", max_size=40)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    v4=st.sampled_from(["10.5.3.0-24", "0.0.0.0-0", "10.5.3.0-024", ""]),
    v6=_key_part,
    fields=st.dictionaries(
        st.sampled_from(["PublicIP", "PublicIPv6", "BackendType", "BackendV6Data", "publicipv6"]),
        _json_value,
        max_size=5,
    ),
    raw=st.binary(max_size=30),
    use_raw=st.booleans(),
)
def test_malformed_ipv6_records_are_skipped_never_raised(
    v4: str, v6: str, fields: dict[str, Any], raw: bytes, use_raw: bool
) -> None:
    """Whatever a key's IPv6 part and a value hold, a book takes it: a valid peer or a
    rejection (reported once), never an exception."""
    value = raw if use_raw else json.dumps(fields).encode()
    for config in (DUAL_CONFIG, parse_config(V6_ONLY)):
        book = LeaseBook(config, own_ip=OWN_IP, own_ipv6=OWN_IPV6)
        book.put(Record(f"/p/subnets/{v4}&{v6}", value, True, 3))
        assert len(book.valid()) + len(book.take_rejections()) <= 1
        book.delete(f"/p/subnets/{v4}&{v6}")
        assert book.valid() == []


# -- allocation and subnet.env ----------------------------------------------------------------


def test_free_ipv6_subnets_skip_taken_and_stop_at_the_candidate_limit() -> None:
    ipv6 = DUAL_CONFIG.ipv6
    assert ipv6 is not None
    taken = [IPv6Network("fd00:10:0:1::/64"), IPv6Network("fd00:10:0:3::/64")]
    free = free_ipv6_subnets(ipv6, taken)
    assert free[:2] == [IPv6Network("fd00:10:0:2::/64"), IPv6Network("fd00:10:0:4::/64")]
    assert len(free) == CANDIDATES


def test_subnet_env_ipv6_lines_in_flanneld_order() -> None:
    env = SubnetEnv.for_lease(
        IPv4Network("10.5.0.0/16"),
        IPv4Network("10.5.52.0/24"),
        1450,
        True,
        (IPv6Network("fd00:10::/56"), IPv6Network("fd00:10:0:34::/64")),
    )
    text = env.render()
    assert text == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.52.1/24\n"
        "FLANNEL_IPV6_NETWORK=fd00:10::/56\n"
        "FLANNEL_IPV6_SUBNET=fd00:10:0:34::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )
    back = parse_subnet_env(text)
    assert back == env and back.subnet == IPv4Interface("10.5.52.1/24")


def test_subnet_env_ipv6_only_has_no_ipv4_lines_as_flanneld_writes_it() -> None:
    """flanneld's WriteSubnetFile writes FLANNEL_NETWORK and FLANNEL_SUBNET only when IPv4
    is enabled: an IPv6-only subnet.env has the IPv6 lines, MTU and IPMASQ alone, and is
    read back as the previous lease (no FLANNEL_SUBNET needed)."""
    env = SubnetEnv.for_lease(
        None,
        NO_IPV4,
        1430,
        False,
        (IPv6Network("fd00:10::/56"), IPv6Network("fd00:10:0:34::/64")),
    )
    text = env.render()
    assert text == (
        "FLANNEL_IPV6_NETWORK=fd00:10::/56\n"
        "FLANNEL_IPV6_SUBNET=fd00:10:0:34::1/64\n"
        "FLANNEL_MTU=1430\n"
        "FLANNEL_IPMASQ=false\n"
    )
    back = parse_subnet_env(text)
    assert back == env and back.subnet is None and back.network is None
    assert back.ipv6_subnet == IPv6Interface("fd00:10:0:34::1/64")
    # Without the IPv6 lines the IPv4 ones are still required.
    with pytest.raises(SubnetEnvError, match="FLANNEL_NETWORK is missing"):
        parse_subnet_env("FLANNEL_MTU=1450\nFLANNEL_IPV6_NETWORK=fd00:10::/56\n")


# -- acquisition on both registries -----------------------------------------------------------


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer | None]:
    if shutil.which("etcd") is None:
        yield None
        return
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["file", "etcd"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, etcd_server: EtcdServer | None
) -> AsyncIterator[tuple[KeyValueStore, str]]:
    """(a registry, a key prefix of this test alone), each kind in turn."""
    prefix = f"/t{uuid.uuid4().hex[:8]}/network"
    if request.param == "file":
        yield FileRegistry(tmp_path / "registry.json", poll_interval=0.01), prefix
        return
    if etcd_server is None:
        pytest.fail("etcd is not installed (`make setup` installs it)")
    registry = EtcdRegistry(parse_endpoints(etcd_server.endpoint))
    try:
        yield registry, prefix
    finally:
        await registry.close()


def node(kv: KeyValueStore, prefix: str, n: int, **kwargs: Any) -> SubnetManager:
    return SubnetManager(
        kv,
        public_ip=IPv4Address(f"192.0.2.{n}"),
        public_ipv6=IPv6Address(f"2001:db8::{n}"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": MAC4},
        backend_v6_data={"VNI": 1, "VtepMAC": MAC6},
        prefix=prefix,
        rng=random.Random(n),
        **kwargs,
    )


async def seed(kv: KeyValueStore, prefix: str, config: dict[str, Any]) -> Any:
    await kv.put(f"{prefix}/config", json.dumps(config).encode(), None)
    read = await node(kv, prefix, 254).read_config()
    assert read is not None
    return read


async def test_dual_stack_acquire_writes_flanneld_records(
    store: tuple[KeyValueStore, str],
) -> None:
    kv, prefix = store
    config = await seed(kv, prefix, DUAL)
    leases = [await node(kv, prefix, n).acquire(config) for n in (1, 2, 3)]
    assert len({x.subnet for x in leases}) == 3 and len({x.ipv6_subnet for x in leases}) == 3
    entries, _ = await kv.list_prefix(f"{prefix}/subnets/")
    assert sorted(e.key.rsplit("/", 1)[-1] for e in entries) == sorted(x.key for x in leases)
    for lease in leases:
        assert lease.ipv6_subnet is not None and lease.ipv6_subnet.prefixlen == 64
        assert lease.ipv6_subnet.subnet_of(IPv6Network("fd00:10::/56"))
        assert lease.ipv6_subnet != IPv6Network("fd00:10::/64")  # IPv6SubnetMin skips it
        entry = next(e for e in entries if e.key.endswith("/" + lease.key))
        n = str(lease.public_ip).rsplit(".", 1)[1]
        assert entry.value.decode() == (
            f'{{"PublicIP":"192.0.2.{n}","PublicIPv6":"2001:db8::{n}","BackendType":"vxlan",'
            f'"BackendData":{{"VNI":1,"VtepMAC":"{MAC4}"}},'
            f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{MAC6}"}}}}'
        )


async def test_previous_ipv6_subnet_from_subnet_env_is_taken_first(
    store: tuple[KeyValueStore, str],
) -> None:
    kv, prefix = store
    config = await seed(kv, prefix, DUAL)
    lease = await node(kv, prefix, 1).acquire(
        config, IPv4Network("10.5.77.0/24"), IPv6Network("fd00:10:0:aa::/64")
    )
    assert lease.key == "10.5.77.0-24&fd00:10:0:aa::-64"
    # The same node again (same public IP): its lease, both halves, whatever subnet.env says.
    again = await node(kv, prefix, 1).acquire(config, IPv4Network("10.5.9.0/24"))
    assert again.key == lease.key
    # A previous IPv6 subnet that another lease holds is not taken.
    other = await node(kv, prefix, 2).acquire(
        config, IPv4Network("10.5.78.0/24"), IPv6Network("fd00:10:0:aa::/64")
    )
    assert other.ipv6_subnet != lease.ipv6_subnet


async def test_previous_ipv6_only_subnet_env_is_taken_back(
    store: tuple[KeyValueStore, str],
) -> None:
    """IPv6 only: the subnet.env a previous run wrote (no IPv4 lines) is read back and its
    FLANNEL_IPV6_SUBNET asked for first, as the daemon does at start."""
    kv, prefix = store
    config = await seed(kv, prefix, V6_ONLY)
    previous = parse_subnet_env(
        "FLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:ab::1/64\n"
        "FLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n"
    )
    assert previous.subnet is None and previous.ipv6_subnet is not None
    lease = await node(kv, prefix, 1).acquire(config, None, previous.ipv6_subnet.network)
    assert lease.key == "0.0.0.0-0&fd00:10:0:ab::-64"


async def test_an_ipv4_only_lease_of_ours_is_replaced_when_ipv6_is_enabled(
    store: tuple[KeyValueStore, str],
) -> None:
    """flanneld's isIPv6SubnetConfigCompat: our lease without an IPv6 half no longer
    fits a dual-stack config; it is deleted and a dual-stack one made."""
    kv, prefix = store
    config4 = await seed(kv, prefix, {"Network": "10.5.0.0/16"})
    old = await node(kv, prefix, 1).acquire(config4)
    config = await seed(kv, prefix, DUAL)
    new = await node(kv, prefix, 1).acquire(config, old.subnet)
    assert new.subnet == old.subnet and new.ipv6_subnet is not None
    entries, _ = await kv.list_prefix(f"{prefix}/subnets/")
    assert [e.key.rsplit("/", 1)[-1] for e in entries] == [new.key]


async def test_ipv6_only_nodes_each_get_a_lease_keyed_as_flanneld_keys_it(
    store: tuple[KeyValueStore, str],
) -> None:
    """flanneld v0.20.2 would give the second IPv6-only node "out of subnets" (every
    key's IPv4 half is 0.0.0.0/0, which overlaps the next) or the first node's lease
    (it matches leases by PublicIP, 0.0.0.0 on all of them); we key them the same way
    and tell them apart by their IPv6 halves and PublicIPv6."""
    kv, prefix = store
    config = await seed(kv, prefix, V6_ONLY)
    a = await node(kv, prefix, 1).acquire(config)
    b = await node(kv, prefix, 2).acquire(config)
    assert a.key.startswith("0.0.0.0-0&fd00:10:0:") and b.key.startswith("0.0.0.0-0&")
    assert a.ipv6_subnet != b.ipv6_subnet
    entries, _ = await kv.list_prefix(f"{prefix}/subnets/")
    value = next(e.value for e in entries if e.key.endswith("/" + a.key)).decode()
    assert value == (
        '{"PublicIP":"0.0.0.0","PublicIPv6":"2001:db8::1","BackendType":"vxlan",'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{MAC6}"}}}}'
    )
    assert (await node(kv, prefix, 1).acquire(config)).key == a.key  # reused, by PublicIPv6


async def test_a_full_ipv6_network_is_network_full(store: tuple[KeyValueStore, str]) -> None:
    kv, prefix = store
    config = await seed(kv, prefix, {**DUAL, "IPv6Network": "fd00:10::/124"})
    for n in (1, 2, 3):  # /124 in /126s: three after the skipped first
        await node(kv, prefix, n).acquire(config)
    with pytest.raises(NetworkFull, match=r"no free /126 left in IPv6Network fd00:10::/124"):
        await node(kv, prefix, 4).acquire(config)
    await asyncio.sleep(0)
