"""Config, lease, subnet.env, allocation and peer-table models (control/), in flannel's terms."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Network

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from control.allocation import CANDIDATES, choose_subnet, free_subnets
from control.config import ConfigError, NetworkConfig, config_json, parse_config
from control.lease import (
    DEFAULT_PREFIX,
    Lease,
    LeaseError,
    lease_value_json,
    parse_lease,
    parse_subnet_key,
    subnet_key,
)
from control.peer_table import PeerTable
from control.subnet_env import SubnetEnv, SubnetEnvError, parse_subnet_env

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- config: defaults ----------------------------------------------------------------------


def test_defaults_for_a_slash_16() -> None:
    config = parse_config('{"Network": "10.244.0.0/16"}')
    assert config.network == IPv4Network("10.244.0.0/16")
    assert config.subnet_len == 24
    assert config.subnet_min == IPv4Network("10.244.1.0/24")  # the first subnet is skipped
    assert config.subnet_max == IPv4Network("10.244.255.0/24")
    assert config.subnet_size == 256
    subnets = config.subnets()
    assert len(subnets) == 255
    assert subnets[0] == config.subnet_min and subnets[-1] == config.subnet_max


def test_backend_absent_means_udp_8285() -> None:
    # flannel's real default (issue #1221), not the documented vxlan.
    backend = parse_config('{"Network": "10.244.0.0/16"}').backend
    assert backend.type == "udp"
    assert backend.port == 8285
    assert backend.direct_routing is False


@pytest.mark.parametrize(
    ("network", "subnet_len", "subnet_min", "subnet_max"),
    [
        ("10.244.0.0/16", 24, "10.244.1.0/24", "10.244.255.0/24"),
        ("10.0.0.0/8", 24, "10.0.1.0/24", "10.255.255.0/24"),
        ("10.244.0.0/22", 24, "10.244.1.0/24", "10.244.3.0/24"),
        ("10.244.0.0/23", 25, "10.244.0.128/25", "10.244.1.128/25"),
        ("10.244.3.0/24", 26, "10.244.3.64/26", "10.244.3.192/26"),
        ("198.18.0.0/28", 30, "198.18.0.4/30", "198.18.0.12/30"),
    ],
)
def test_default_subnet_len_min_max(
    network: str, subnet_len: int, subnet_min: str, subnet_max: str
) -> None:
    config = parse_config({"Network": network})
    assert config.subnet_len == subnet_len
    assert config.subnet_min == IPv4Network(subnet_min)
    assert config.subnet_max == IPv4Network(subnet_max)


def test_explicit_subnet_len_min_max() -> None:
    config = parse_config(
        {
            "Network": "10.244.0.0/16",
            "SubnetLen": 26,
            "SubnetMin": "10.244.10.0",
            "SubnetMax": "10.244.20.192",
        }
    )
    assert config.subnet_len == 26
    assert config.subnet_min == IPv4Network("10.244.10.0/26")
    assert config.subnet_max == IPv4Network("10.244.20.192/26")
    assert len(config.subnets()) == 11 * 4


@pytest.mark.parametrize(
    "raw",
    [
        {"network": "10.244.0.0/16", "subnetlen": 25, "backend": {"type": "vxlan"}},
        {"NETWORK": "10.244.0.0/16", "SUBNETLEN": 25, "BACKEND": {"TYPE": "vxlan"}},
        {"NeTwOrK": "10.244.0.0/16", "subnetLen": 25, "Backend": {"tYpE": "vxlan"}},
    ],
)
def test_field_names_in_any_case(raw: dict[str, object]) -> None:
    config = parse_config(json.dumps(raw))
    assert config.network == IPv4Network("10.244.0.0/16")
    assert config.subnet_len == 25
    assert config.backend.type == "vxlan"


def test_accepts_bytes_str_and_dict() -> None:
    text = '{"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}'
    assert parse_config(text) == parse_config(text.encode()) == parse_config(json.loads(text))


def test_vxlan_defaults_and_flannel_lowercase_options() -> None:
    defaults = parse_config({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}).backend
    assert (defaults.type, defaults.vni, defaults.port, defaults.direct_routing) == (
        "vxlan",
        1,
        8472,
        False,
    )
    # flannel's own spelling (kube-flannel.yml): lowercase option names.
    flannel = parse_config(
        '{"Network": "10.244.0.0/16", "Backend": '
        '{"Type": "vxlan", "vni": 4096, "port": 4789, "directRouting": true}}'
    ).backend
    assert (flannel.vni, flannel.port, flannel.direct_routing) == (4096, 4789, True)
    upper = parse_config(
        {
            "Network": "10.244.0.0/16",
            "Backend": {"Type": "vxlan", "VNI": 7, "Port": 4789, "DirectRouting": True},
        }
    ).backend
    assert (upper.vni, upper.port, upper.direct_routing) == (7, 4789, True)
    # Unknown options are kept, not dropped.
    kept = parse_config(
        {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "GBP": False, "mtu": 1400}}
    ).backend
    assert kept.options["gbp"] is False and kept.options["mtu"] == 1400


def test_udp_custom_port_and_host_gw() -> None:
    udp = parse_config({"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 9000}})
    assert udp.backend.port == 9000
    host_gw = parse_config({"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw"}})
    assert host_gw.backend.type == "host-gw"


def test_config_json_seeds_a_parseable_config() -> None:
    text = config_json(IPv4Network("198.18.0.0/16"), "vxlan")
    config = parse_config(text)
    assert config.network == IPv4Network("198.18.0.0/16")
    assert config.backend.type == "vxlan"


# -- config: validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "Network"),
        ({"SubnetLen": 24}, "Network"),
        ({"Network": "bogus"}, "Network"),
        ({"Network": "10.244.0.0/33"}, "Network"),
        ({"Network": "fc00::/64"}, "Network"),
        ({"Network": 42}, "Network"),
        ({"Network": "10.244.0.0/29"}, "Network"),
        ({"Network": "10.244.0.0/32"}, "Network"),
        ({"Network": "10.244.0.0/16", "SubnetLen": 31}, "SubnetLen"),
        ({"Network": "10.244.0.0/16", "SubnetLen": 32}, "SubnetLen"),
        ({"Network": "10.244.0.0/16", "SubnetLen": 17}, "SubnetLen"),
        ({"Network": "10.244.0.0/16", "SubnetLen": 16}, "SubnetLen"),
        ({"Network": "10.244.0.0/16", "SubnetLen": 0}, "SubnetLen"),
        ({"Network": "10.244.0.0/16", "SubnetLen": "24"}, "SubnetLen"),
        ({"Network": "10.244.0.0/16", "SubnetLen": True}, "SubnetLen"),
        ({"Network": "10.244.0.0/16", "SubnetLen": 24.0}, "SubnetLen"),
        ({"Network": "10.244.0.0/28", "SubnetLen": 29}, "SubnetLen"),
        ({"Network": "10.244.0.0/16", "SubnetMin": "10.245.1.0"}, "SubnetMin"),
        ({"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.1"}, "SubnetMin"),
        ({"Network": "10.244.0.0/16", "SubnetMin": "nonsense"}, "SubnetMin"),
        ({"Network": "10.244.0.0/16", "SubnetMax": "10.243.255.0"}, "SubnetMax"),
        ({"Network": "10.244.0.0/16", "SubnetMax": "10.244.7.128"}, "SubnetMax"),
        (
            {"Network": "10.244.0.0/16", "SubnetLen": 26, "SubnetMax": "10.244.7.32"},
            "SubnetMax",
        ),
        ({"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.3.0"}, "Min"),
        (
            {"Network": "10.244.0.0/16", "SubnetMin": "10.244.255.0", "SubnetMax": "10.244.0.0"},
            "Min",
        ),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "gre"}}, "Backend.Type"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "UDP"}}, "Backend.Type"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": 3}}, "Backend.Type"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": ""}}, "Backend.Type"),
        ({"Network": "10.244.0.0/16", "Backend": "udp"}, "Backend"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 70000}}, "Backend.Port"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": 65536}}, "Backend.Port"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": -1}}, "Backend.Port"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "udp", "Port": "80"}}, "Backend.Port"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "port": 99999}}, "Backend.Port"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "vni": 1 << 24}}, "Backend.VNI"),
        ({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "vni": -1}}, "Backend.VNI"),
        (
            {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "directRouting": "yes"}},
            "Backend.DirectRouting",
        ),
        ({"Network": "10.244.0.0/16", "EnableIPv4": False}, "EnableIPv4"),
    ],
)
def test_invalid_config_names_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(json.dumps(raw))
    message = str(info.value)
    assert field in message
    assert "\n" not in message


def test_deeply_nested_config_raises_config_error() -> None:
    # json.loads raises RecursionError (not a ValueError) on deep nesting.
    with pytest.raises(ConfigError):
        parse_config('{"Network": ' + "[" * 100_000)


@pytest.mark.parametrize("text", ["", "{", "[]", '"10.244.0.0/16"', "null", "42", b"\xff\xfe{"])
def test_config_that_is_not_a_json_object(text: str | bytes) -> None:
    with pytest.raises(ConfigError, match="JSON"):
        parse_config(text)


def test_boundary_values_accepted() -> None:
    assert parse_config({"Network": "10.244.0.0/16", "SubnetLen": 30}).subnet_len == 30
    assert parse_config({"Network": "10.244.0.0/16", "SubnetLen": 18}).subnet_len == 18
    port = parse_config({"Network": "10.0.0.0/8", "Backend": {"Type": "udp", "Port": 65535}})
    assert port.backend.port == 65535
    # SubnetMin may be the very first subnet and equal SubnetMax.
    one = parse_config(
        {"Network": "10.244.0.0/16", "SubnetMin": "10.244.0.0", "SubnetMax": "10.244.0.0"}
    )
    assert one.subnets() == [IPv4Network("10.244.0.0/24")]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(
        ["10.244.0.0/16", "10.0.0.0/8", "10.244.3.0", "10.244.0.0/30", "udp", "vxlan", "host-gw"]
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
config_keys = st.sampled_from(
    ["Network", "network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4"]
)
backend_dicts = st.dictionaries(
    st.sampled_from(["Type", "Port", "VNI", "vni", "port", "directRouting"]), json_values
)


@FAST
@given(st.dictionaries(config_keys, json_values | backend_dicts | st.integers(0, 40), max_size=6))
def test_random_configs_raise_only_config_error(raw: dict[str, object]) -> None:
    try:
        config = parse_config(json.dumps(raw))
    except ConfigError:
        return
    assert isinstance(config, NetworkConfig)
    assert config.subnet_min.subnet_of(config.network)
    assert config.subnet_max.subnet_of(config.network)
    assert config.network.prefixlen + 2 <= config.subnet_len <= 30


@FAST
@given(st.text(max_size=60))
def test_random_text_config_raises_only_config_error(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError:
        pass


# -- lease keys and values -----------------------------------------------------------------


def test_subnet_key_format() -> None:
    assert subnet_key(IPv4Network("10.244.3.0/24")) == "10.244.3.0-24"
    assert (
        subnet_key(IPv4Network("10.244.3.0/24"), IPv6Network("fc00::/64"))
        == "10.244.3.0-24&fc00::-64"
    )
    assert DEFAULT_PREFIX == "/coreos.com/network"


@pytest.mark.parametrize(
    ("key", "v4", "v6"),
    [
        ("10.244.3.0-24", "10.244.3.0/24", None),
        ("10.5.52.0-24", "10.5.52.0/24", None),
        ("10.244.3.0-24&fc00::-64", "10.244.3.0/24", "fc00::/64"),
        ("198.18.0.128-25&fd00:1:2:3::-64", "198.18.0.128/25", "fd00:1:2:3::/64"),
        ("/coreos.com/network/subnets/10.244.3.0-24", "10.244.3.0/24", None),
        ("/coreos.com/network/subnets/10.244.3.0-24&fc00::-64", "10.244.3.0/24", "fc00::/64"),
    ],
)
def test_parse_subnet_key(key: str, v4: str, v6: str | None) -> None:
    subnet, ipv6 = parse_subnet_key(key)
    assert subnet == IPv4Network(v4)
    assert ipv6 == (IPv6Network(v6) if v6 else None)
    assert subnet_key(subnet, ipv6) == key.rsplit("/", 1)[-1]


@FAST
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
    st.none() | st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)),
)
def test_subnet_key_round_trip(address: int, prefix: int, v6: tuple[int, int] | None) -> None:
    subnet = IPv4Network((address, prefix), strict=False)
    ipv6 = None if v6 is None else IPv6Network(v6, strict=False)
    key = subnet_key(subnet, ipv6)
    assert parse_subnet_key(key) == (subnet, ipv6)
    assert parse_subnet_key(f"{DEFAULT_PREFIX}/subnets/{key}") == (subnet, ipv6)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "10.244.3.0",
        "10.244.3.0/24",
        "10.244.3.0-",
        "10.244.3.0-abc",
        "10.244.3.0-33",
        "10.244.3.1-24",  # host bits set
        "10.244.300.0-24",
        "fc00::-64",
        "10.244.3.0-24&fc00::",
        "10.244.3.0-24&bogus-64",
        "10.244.3.0-24&fc00::-129",
        "/coreos.com/network/subnets/",
    ],
)
def test_bad_subnet_keys(key: str) -> None:
    with pytest.raises(LeaseError):
        parse_subnet_key(key)


UDP_VALUE = '{"PublicIP":"192.0.2.3","PublicIPv6":null}'
VXLAN_VALUE = (
    '{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"02:00:00:00:00:01"}}'
)


def test_lease_value_json_is_byte_exact_with_flanneld() -> None:
    udp = Lease(subnet=IPv4Network("10.244.3.0/24"), public_ip=IPv4Address("192.0.2.3"))
    assert lease_value_json(udp) == UDP_VALUE
    assert udp.value_json() == UDP_VALUE
    assert udp.key == "10.244.3.0-24"
    vxlan = Lease(
        subnet=IPv4Network("10.244.3.0/24"),
        public_ip=IPv4Address("192.0.2.3"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:01"},
    )
    assert lease_value_json(vxlan) == VXLAN_VALUE
    dual = Lease(
        subnet=IPv4Network("10.244.3.0/24"),
        public_ip=IPv4Address("192.0.2.3"),
        ipv6_subnet=IPv6Network("fc00::/64"),
        public_ipv6=IPv6Address("fc00::3"),
    )
    assert dual.key == "10.244.3.0-24&fc00::-64"
    assert dual.value_json() == '{"PublicIP":"192.0.2.3","PublicIPv6":"fc00::3"}'


@pytest.mark.parametrize(
    "value",
    [
        UDP_VALUE,
        VXLAN_VALUE,
        '{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
        '{"PublicIP":"192.0.2.7","PublicIPv6":"fc00::7"}',
    ],
)
def test_flanneld_records_round_trip_byte_exact(value: str) -> None:
    lease = parse_lease("/coreos.com/network/subnets/10.244.3.0-24", value)
    assert lease_value_json(lease) == value
    assert parse_lease("10.244.3.0-24", value.encode()) == lease


def test_parse_flanneld_vxlan_record() -> None:
    lease = parse_lease(
        "/coreos.com/network/subnets/10.5.52.0-24&fc00::-64",
        b'{"PublicIP":"192.168.64.3","PublicIPv6":"fc00::3","BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}',
        has_ttl=False,
    )
    assert lease.subnet == IPv4Network("10.5.52.0/24")
    assert lease.ipv6_subnet == IPv6Network("fc00::/64")
    assert lease.public_ip == IPv4Address("192.168.64.3")
    assert lease.public_ipv6 == IPv6Address("fc00::3")
    assert lease.backend_type == "vxlan"
    assert lease.backend_data == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert lease.has_ttl is False


def test_parse_lease_field_names_in_any_case_and_pretty_json() -> None:
    lease = parse_lease("10.244.3.0-24", '{\n  "publicip": "192.0.2.3",\n  "backendtype": "udp"\n}')
    assert lease.public_ip == IPv4Address("192.0.2.3")
    assert lease.backend_type == "udp"
    assert lease.public_ipv6 is None and lease.backend_data is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("10.244.3.0-24", ""),
        ("10.244.3.0-24", "not json"),
        ("10.244.3.0-24", b"\xff\xfe\x00"),
        ("10.244.3.0-24", "[]"),
        ("10.244.3.0-24", "null"),
        ("10.244.3.0-24", '"192.0.2.3"'),
        ("10.244.3.0-24", "{}"),
        ("10.244.3.0-24", '{"PublicIP":null}'),
        ("10.244.3.0-24", '{"PublicIP":"300.0.0.1"}'),
        ("10.244.3.0-24", '{"PublicIP":"fc00::1"}'),
        ("10.244.3.0-24", '{"PublicIP":3221225987}'),
        ("10.244.3.0-24", '{"PublicIP":"192.0.2.3","PublicIPv6":"192.0.2.3"}'),
        ("10.244.3.0-24", '{"PublicIP":"192.0.2.3","BackendType":5}'),
        ("10.244.3.0-24", '{"PublicIP":"192.0.2.3","BackendData":"x"}'),
        ("10.244.3.0-24", '{"PublicIP":"192.0.2.3","BackendData":[1]}'),
        ("10.244.3.0/24", UDP_VALUE),
        ("10.244.3.1-24", UDP_VALUE),
        ("config", UDP_VALUE),
    ],
)
def test_malformed_leases_raise_lease_error(key: str, value: str | bytes) -> None:
    with pytest.raises(LeaseError):
        parse_lease(key, value)


def test_deeply_nested_lease_value_raises_lease_error() -> None:
    # A broken record in the registry must be reported and skipped, never crash the watch.
    with pytest.raises(LeaseError):
        parse_lease("10.244.3.0-24", "[" * 100_000)


@FAST
@given(st.text(max_size=80), st.text(max_size=80))
@example("10.244.3.0-24", '{"PublicIP":"1.2.3.4","PublicIPv6":1}')
@example("10.244.3.0-24", '{"PublicIP":"1.2.3.4","PublicIPv6":{}}')
@example("10.244.3.0-24", '{"PublicIP":"1.2.3.4","PublicIP":1e400}')
def test_random_text_raises_only_lease_error(key: str, value: str) -> None:
    for k in (key, "10.244.3.0-24"):
        try:
            parse_lease(k, value)
        except LeaseError:
            pass


@FAST
@given(
    st.dictionaries(
        st.sampled_from(["PublicIP", "PublicIPv6", "BackendType", "BackendData", "publicip"]),
        json_values,
    )
)
def test_random_json_values_raise_only_lease_error(raw: dict[str, object]) -> None:
    try:
        lease = parse_lease("10.244.3.0-24", json.dumps(raw))
    except LeaseError:
        return
    assert isinstance(lease.public_ip, IPv4Address)


# -- subnet.env ----------------------------------------------------------------------------

SUBNET_ENV = (
    "FLANNEL_NETWORK=10.244.0.0/16\n"
    "FLANNEL_SUBNET=10.244.3.1/24\n"
    "FLANNEL_MTU=1472\n"
    "FLANNEL_IPMASQ=false\n"
)


def test_subnet_env_render_exact_text() -> None:
    env = SubnetEnv.for_lease(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.3.0/24"), 1472)
    assert env.subnet == IPv4Interface("10.244.3.1/24")
    assert env.render() == SUBNET_ENV
    masq = SubnetEnv.for_lease(
        IPv4Network("10.244.0.0/16"), IPv4Network("10.244.3.0/24"), 1450, ip_masq=True
    )
    assert masq.render() == SUBNET_ENV.replace("1472", "1450").replace("false", "true")


def test_subnet_env_parse_round_trip() -> None:
    env = parse_subnet_env(SUBNET_ENV)
    assert env == SubnetEnv(
        network=IPv4Network("10.244.0.0/16"),
        subnet=IPv4Interface("10.244.3.1/24"),
        mtu=1472,
        ip_masq=False,
    )
    assert env.render() == SUBNET_ENV
    assert env.subnet.network == IPv4Network("10.244.3.0/24")
    masq = SubnetEnv.for_lease(
        IPv4Network("198.18.0.0/16"), IPv4Network("198.18.7.0/24"), 1450, ip_masq=True
    )
    assert parse_subnet_env(masq.render()) == masq


def test_subnet_env_parse_tolerates_flannel_extras() -> None:
    text = "# written by flanneld\n\n" + SUBNET_ENV + "FLANNEL_IPV6_NETWORK=fc00::/48\n"
    assert parse_subnet_env(text).mtu == 1472


@pytest.mark.parametrize(
    "text",
    [
        "",
        SUBNET_ENV.replace("FLANNEL_MTU=1472\n", ""),
        SUBNET_ENV.replace("FLANNEL_NETWORK=10.244.0.0/16\n", ""),
        SUBNET_ENV.replace("FLANNEL_SUBNET=10.244.3.1/24\n", ""),
        SUBNET_ENV.replace("1472", "big"),
        SUBNET_ENV.replace("10.244.3.1/24", "10.244.3.1/99"),
        SUBNET_ENV + "garbage line\n",
    ],
)
def test_subnet_env_parse_errors(text: str) -> None:
    with pytest.raises(SubnetEnvError):
        parse_subnet_env(text)


# -- allocation ----------------------------------------------------------------------------


def _config(**fields: object) -> NetworkConfig:
    return parse_config({"Network": "10.244.0.0/16", **fields})


def test_free_subnets_start_at_subnet_min_and_skip_taken() -> None:
    config = _config()
    taken = [IPv4Network("10.244.1.0/24"), IPv4Network("10.244.3.0/24")]
    free = free_subnets(config, taken, limit=3)
    assert free == [
        IPv4Network("10.244.2.0/24"),
        IPv4Network("10.244.4.0/24"),
        IPv4Network("10.244.5.0/24"),
    ]
    assert IPv4Network("10.244.0.0/24") not in free_subnets(config, [])
    assert len(free_subnets(config, [])) == CANDIDATES


def test_free_subnets_respect_min_and_max() -> None:
    config = _config(SubnetMin="10.244.10.0", SubnetMax="10.244.14.0")
    assert free_subnets(config, [IPv4Network("10.244.12.0/24")]) == [
        IPv4Network(f"10.244.{i}.0/24") for i in (10, 11, 13, 14)
    ]


def test_free_subnets_skip_overlapping_prefixes() -> None:
    config = _config(SubnetMax="10.244.8.0")
    # A /22 record (another SubnetLen) and a /26 inside 10.244.6.0/24 are both in the way.
    taken = [IPv4Network("10.244.0.0/22"), IPv4Network("10.244.6.64/26")]
    assert free_subnets(config, taken) == [IPv4Network(f"10.244.{i}.0/24") for i in (4, 5, 7, 8)]


def test_full_network_gives_none() -> None:
    config = _config(SubnetMin="10.244.1.0", SubnetMax="10.244.3.0")
    taken = [IPv4Network(f"10.244.{i}.0/24") for i in (1, 2, 3)]
    assert free_subnets(config, taken) == []
    assert choose_subnet(config, taken) is None
    assert choose_subnet(config, taken[:2]) == IPv4Network("10.244.3.0/24")


def test_choose_subnet_is_random_among_the_free_candidates() -> None:
    config = _config()
    taken = [IPv4Network("10.244.2.0/24")]
    candidates = set(free_subnets(config, taken))
    rng = random.Random(7)
    chosen = {choose_subnet(config, taken, rng) for _ in range(200)}
    assert chosen <= candidates
    assert len(chosen) > 20  # spread out, so concurrent joiners rarely collide


# -- peer table ----------------------------------------------------------------------------


def _lease(
    subnet: str,
    public_ip: str,
    backend_type: str = "",
    backend_data: dict[str, object] | None = None,
) -> Lease:
    return Lease(
        subnet=IPv4Network(subnet),
        public_ip=IPv4Address(public_ip),
        backend_type=backend_type,
        backend_data=backend_data,
    )


def _ip(address: str) -> bytes:
    return IPv4Address(address).packed


def test_peer_table_lookup_inside_and_outside() -> None:
    table = PeerTable(port=8285)
    assert table.upsert(_lease("10.244.3.0/24", "192.0.2.3"))
    assert table.upsert(_lease("10.244.4.0/24", "192.0.2.4"))
    assert len(table) == 2
    assert IPv4Network("10.244.3.0/24") in table
    for address, public in [
        ("10.244.3.0", "192.0.2.3"),
        ("10.244.3.7", "192.0.2.3"),
        ("10.244.3.255", "192.0.2.3"),
        ("10.244.4.1", "192.0.2.4"),
    ]:
        peer = table.lookup(_ip(address))
        assert peer is not None and peer.addr == (public, 8285)
        assert peer.owns(_ip(address))
    for address in ["10.244.2.255", "10.244.5.0", "10.245.3.7", "0.0.0.0", "255.255.255.255"]:
        assert table.lookup(_ip(address)) is None
    assert table.lookup(bytearray(_ip("10.244.3.9"))) is not None
    assert table.lookup(memoryview(_ip("10.244.3.9"))) is not None
    peer = table.lookup(_ip("10.244.3.9"))
    assert peer is not None and not peer.owns(_ip("10.244.4.9"))
    assert table.by_public_ip("192.0.2.4") is table.get(IPv4Network("10.244.4.0/24"))
    assert table.by_public_ip("192.0.2.99") is None


def test_peer_table_longest_prefix_wins() -> None:
    table = PeerTable(port=8472)
    table.upsert(_lease("10.244.0.0/16", "192.0.2.16"))
    table.upsert(_lease("10.244.3.0/24", "192.0.2.24"))
    table.upsert(_lease("10.244.3.128/26", "192.0.2.26"))
    expected = {
        "10.244.3.130": "192.0.2.26",
        "10.244.3.191": "192.0.2.26",
        "10.244.3.192": "192.0.2.24",
        "10.244.3.5": "192.0.2.24",
        "10.244.9.5": "192.0.2.16",
    }
    for address, public in expected.items():
        peer = table.lookup(_ip(address))
        assert peer is not None and peer.addr[0] == public, address
    table.remove(IPv4Network("10.244.3.128/26"))
    peer = table.lookup(_ip("10.244.3.130"))
    assert peer is not None and peer.addr[0] == "192.0.2.24"


def test_peer_table_upsert_and_remove() -> None:
    table = PeerTable(port=8285)
    lease = _lease("10.244.3.0/24", "192.0.2.3")
    assert table.upsert(lease) is True
    assert table.upsert(_lease("10.244.3.0/24", "192.0.2.3")) is False  # same content
    assert table.upsert(_lease("10.244.3.0/24", "192.0.2.33")) is True
    peer = table.lookup(_ip("10.244.3.1"))
    assert peer is not None and peer.addr == ("192.0.2.33", 8285)
    assert table.by_public_ip("192.0.2.3") is None
    removed = table.remove(IPv4Network("10.244.3.0/24"))
    assert removed is not None and removed.lease.public_ip == IPv4Address("192.0.2.33")
    assert table.remove(IPv4Network("10.244.3.0/24")) is None
    assert table.lookup(_ip("10.244.3.1")) is None
    assert len(table) == 0 and table.peers() == []


def test_peer_table_replace_all_reports_changes_and_removals() -> None:
    table = PeerTable(port=8472)
    a = _lease(
        "10.244.1.0/24",
        "192.0.2.1",
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:01"},
    )
    b = _lease("10.244.2.0/24", "192.0.2.2")
    c = _lease("10.244.3.0/24", "192.0.2.3")
    changed, removed = table.replace_all([a, b, c])
    assert sorted(map(str, (x.subnet for x in changed))) == [
        "10.244.1.0/24",
        "10.244.2.0/24",
        "10.244.3.0/24",
    ]
    assert removed == []
    assert table.replace_all([a, b, c]) == ([], [])
    # Same subnets, new content: a new VtepMAC and a new PublicIP are both applied.
    a2 = _lease(
        "10.244.1.0/24",
        "192.0.2.1",
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": "02:00:00:00:00:99"},
    )
    b2 = _lease("10.244.2.0/24", "192.0.2.22")
    d = _lease("10.244.4.0/24", "192.0.2.4")
    changed, removed = table.replace_all([a2, b2, d])
    assert {x.subnet for x in changed} == {a2.subnet, b2.subnet, d.subnet}
    assert b2 in changed and a2 in changed
    assert removed == [c]
    peer = table.lookup(_ip("10.244.2.9"))
    assert peer is not None and peer.addr == ("192.0.2.22", 8472)
    peer = table.lookup(_ip("10.244.1.9"))
    assert peer is not None and peer.lease.backend_data == a2.backend_data
    assert table.lookup(_ip("10.244.3.9")) is None
    assert table.by_public_ip("192.0.2.2") is None
    assert table.by_public_ip("192.0.2.22") is not None
    changed, removed = table.replace_all([])
    assert changed == [] and {x.subnet for x in removed} == {a2.subnet, b2.subnet, d.subnet}
    assert len(table) == 0


subnets = st.builds(
    lambda address, prefix: IPv4Network((address, prefix), strict=False),
    st.integers(0, 2**32 - 1).map(lambda a: (a & 0x00FFFFFF) | (10 << 24)),  # all in 10/8
    st.integers(8, 32),
)


@FAST
@given(
    st.lists(subnets, max_size=25, unique=True),
    st.lists(st.integers(10 << 24, (11 << 24) - 1), max_size=30),
    st.data(),
)
def test_lookup_matches_brute_force_longest_prefix(
    networks: list[IPv4Network], probes: list[int], data: st.DataObject
) -> None:
    table = PeerTable(port=8285)
    leases = [_lease(str(n), f"192.0.2.{i % 250 + 1}") for i, n in enumerate(networks)]
    if data.draw(st.booleans()):
        table.replace_all(leases)
    else:
        for lease in leases:
            table.upsert(lease)
    # Probe each subnet's edges too, where an off-by-one would show.
    addresses = [IPv4Address(p) for p in probes]
    for n in networks:
        addresses += [n.network_address, n.broadcast_address]
        if n.network_address > IPv4Address("10.0.0.0"):
            addresses.append(n.network_address - 1)
        if n.broadcast_address < IPv4Address("10.255.255.255"):
            addresses.append(n.broadcast_address + 1)
    for address in addresses:
        matches = [n for n in networks if address in n]
        expected = max(matches, key=lambda n: n.prefixlen) if matches else None
        peer = table.lookup(address.packed)
        assert (peer.lease.subnet if peer else None) == expected, address
