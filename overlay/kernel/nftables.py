"""flanneld's own nftables tables (``"EnableNFTables": true``), in place of its iptables
chains: the same table, chain and rule set flanneld v0.25+ writes
(pkg/trafficmngr/nftables), so ``nft list ruleset`` reads the same on a node of ours.

- ``table ip flannel-ipv4`` (and ``table ip6 flannel-ipv6`` with EnableIPv6), comment
  "rules for <table>".
- ``chain postrtg`` (--ip-masq): type nat hook postrouting priority srcnat (100):
  ``meta mark 0x4000 return`` (kube-proxy's mark: no double NAT), return between our
  lease and the network either way, return from outside the network to our lease,
  ``masquerade fully-random`` from the network leaving it (multicast excepted) and from
  outside the network into it.
- ``chain forward`` (--iptables-forward-rules): type filter hook forward priority filter
  (0), accepting the network as source and as destination; no policy (accept), as
  flanneld: a drop policy here would cut the node off.

Written with the ``nft`` command, each chain in one ``nft -f -`` transaction (add the
chain, flush it, add its rules: no packet meets a half-written chain, and a previous
lease's rules cannot survive the flush). Unlike flanneld, which writes them once, they
are checked every ``--iptables-resync`` seconds against ``nft -j list table``; a chain
that differs (a rule missing, added, out of order, its hook or policy changed) is
rewritten. On stop the tables are deleted, as flanneld deletes them: they are ours by
name; any other table is never touched.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any

from overlay.kernel.ipmasq import MULTICAST
from overlay.kernel.traffic import Network, RulesError, Wanted, run_command

TABLES = {4: ("ip", "flannel-ipv4"), 6: ("ip6", "flannel-ipv6")}
MASQ_CHAIN = "postrtg"
FORWARD_CHAIN = "forward"
KUBE_PROXY_MARK = "0x4000"


class NftError(RulesError):
    """An nft command failed; the message is its first line of output."""


@dataclass(frozen=True)
class Chain:
    """One of our base chains and the rules it holds, in nft's own syntax."""

    name: str
    set_name: str  # the rule set it carries ("masq", "forward"), as with iptables
    type: str
    hook: str
    priority: str  # nft's name for it, as flanneld writes it
    prio: int  # the number the kernel lists
    comment: str
    rules: tuple[str, ...]

    @property
    def header(self) -> tuple[str, str, int, str]:
        return (self.type, self.hook, self.prio, "accept")


@dataclass
class Listed:
    """A chain of our table as ``nft -j list table`` shows it."""

    header: tuple[str, str, int, str] | None  # None: a regular chain, no hook
    rules: list[str] = field(default_factory=list)


def masquerade(random_fully: bool) -> str:
    return "masquerade fully-random" if random_fully else "masquerade"


def masq_chain(network: Network, subnet: Network, random_fully: bool) -> Chain:
    family = TABLES[network.version][0]
    net, sub, action = str(network), str(subnet), masquerade(random_fully)
    return Chain(
        MASQ_CHAIN,
        "masq",
        "nat",
        "postrouting",
        "srcnat",
        100,
        "chain to manage traffic masquerading by flannel",
        (
            f"meta mark {KUBE_PROXY_MARK} return",
            f"{family} saddr {sub} {family} daddr {net} return",
            f"{family} saddr {net} {family} daddr {sub} return",
            f"{family} saddr != {sub} {family} daddr {net} return",
            f"{family} saddr {net} {family} daddr != {MULTICAST[network.version]} {action}",
            f"{family} saddr != {net} {family} daddr {net} {action}",
        ),
    )


def forward_chain(network: Network) -> Chain:
    family = TABLES[network.version][0]
    return Chain(
        FORWARD_CHAIN,
        "forward",
        "filter",
        "forward",
        "filter",
        0,
        "chain to accept flannel traffic",
        (f"{family} saddr {network} accept", f"{family} daddr {network} accept"),
    )


def table_script(version: int) -> str:
    family, table = TABLES[version]
    return f'add table {family} {table} {{ comment "rules for {table}" ; }}'


def chain_script(version: int, chain: Chain, listed: Listed | None) -> list[str]:
    """Lines that make ``chain`` exactly ours: created (or recreated when its hook,
    priority or policy differ), flushed, its rules added in order."""
    family, table = TABLES[version]
    head = f"{family} {table} {chain.name}"
    lines = []
    if listed is not None and listed.header != chain.header:
        lines.append(f"delete chain {head}")
    spec = f"type {chain.type} hook {chain.hook} priority {chain.priority} ;"
    lines.append(f'add chain {head} {{ {spec} comment "{chain.comment}" ; }}')
    lines.append(f"flush chain {head}")
    lines += [f"add rule {head} {rule}" for rule in chain.rules]
    return lines


def differences(chain: Chain, listed: Listed | None) -> list[str]:
    """What the kernel's chain lacks or has beyond ours, one line each (empty: exact)."""
    if listed is None:
        return [f"{chain.name}: {rule}" for rule in chain.rules]
    found: list[str] = []
    if listed.header != chain.header:
        found.append(f"{chain.name}: hook, priority or policy {listed.header}")
    found += [f"{chain.name}: {rule}" for rule in chain.rules if rule not in listed.rules]
    found += [f"{chain.name}: not ours: {rule}" for rule in listed.rules if rule not in chain.rules]
    if not found and listed.rules != list(chain.rules):
        found.append(f"{chain.name}: rules out of order")
    return found


def parse_listing(data: str) -> dict[str, Listed]:
    """The chains of one table, from ``nft -j list table`` output."""
    chains: dict[str, Listed] = {}
    for item in json.loads(data).get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            header = None
            if "hook" in c:
                header = (c.get("type"), c["hook"], c.get("prio"), c.get("policy", "accept"))
            chains[c["name"]] = Listed(header)
        elif "rule" in item:
            r = item["rule"]
            chains.setdefault(r["chain"], Listed(None)).rules.append(rule_text(r["expr"]))
    return chains


def rule_text(expr: list[dict[str, Any]]) -> str:
    """A rule's JSON statements in the syntax our chains are written in (the subset
    they use; anything else is spelled as its JSON, so it never equals one of ours)."""
    return " ".join(_statement(statement) for statement in expr)


def _statement(statement: dict[str, Any]) -> str:
    (key, value), *rest = statement.items()
    if rest:
        return json.dumps(statement)
    if key == "match" and isinstance(value, dict):
        left, right = _operand(value.get("left")), _operand(value.get("right"))
        if left == "meta mark" and isinstance(value.get("right"), int):
            right = hex(value["right"])
        op = value.get("op", "==")
        return f"{left} {right}" if op in ("==", "in") else f"{left} {op} {right}"
    if key == "masquerade":
        flags = value.get("flags") if isinstance(value, dict) else None
        if isinstance(flags, list):
            flags = ",".join(flags)
        return f"masquerade {flags}" if flags else "masquerade"
    if value is None:
        return str(key)  # a verdict: return, accept, drop
    return json.dumps(statement)


def _operand(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        ((kind, inner),) = value.items()
        if kind == "meta" and isinstance(inner, dict):
            return f"meta {inner.get('key')}"
        if kind == "payload" and isinstance(inner, dict):
            return f"{inner.get('protocol')} {inner.get('field')}"
        if kind == "prefix" and isinstance(inner, dict):
            return _address(f"{inner.get('addr')}/{inner.get('len')}")
    if isinstance(value, str):
        return _address(value)
    return json.dumps(value)


def _address(text: str) -> str:
    """A network in Python's spelling (a lone address as its /32 or /128)."""
    try:
        return str(ip_network(text, strict=False))
    except ValueError:
        return text


class Nft:
    """The machine's ``nft`` command (one for both families)."""

    binary = "nft"

    def __init__(self) -> None:
        path = shutil.which(self.binary)
        if path is None:
            raise NftError(2, "no nft command: install nftables (EnableNFTables is set)")
        self.path = path
        self.version = self._run("--version").stdout.strip()

    def _run(
        self, *args: str, script: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        shown = " ".join(["nft", *args])
        return run_command([self.path, *args], shown, NftError, stdin=script, check=check)

    def apply(self, lines: list[str]) -> None:
        """Run ``lines`` as one transaction: all of them take effect or none."""
        self._run("-f", "-", script="\n".join([*lines, ""]))

    def listing(self, version: int) -> dict[str, Listed] | None:
        """Our table's chains as the kernel has them; None when there is no table."""
        family, table = TABLES[version]
        proc = self._run("-j", "list", "table", family, table, check=False)
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            text = proc.stderr.strip().splitlines()
            raise NftError(proc.returncode, f"nft list table {family} {table}: {text[0]}")
        try:
            return parse_listing(proc.stdout)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise NftError(74, f"nft -j list table {family} {table}: unreadable: {e}") from None

    def for_ipv6(self) -> Nft:
        return self

    def rules(self, network: Network, subnet: Network, wanted: Wanted) -> NftablesRules:
        return NftablesRules(self, network, subnet, wanted)


class NftablesRules:
    """One family's table of one daemon (a ``TrafficRules``)."""

    repair_kind = "nftables"

    def __init__(self, nft: Nft, network: Network, subnet: Network, wanted: Wanted) -> None:
        self.nft = nft
        self.version = network.version
        self.status_key = "nftables" if self.version == 4 else "nftables6"
        self.network, self.subnet = network, subnet
        self.ip_masq, self.forward = wanted.ip_masq, wanted.forward
        self.random_fully = not wanted.random_fully_disable
        self.chains = self._chains()
        self.repairs = 0
        self.checks = 0

    def _chains(self) -> list[Chain]:
        """flanneld's order: the masq chain is set up first, then the forward one."""
        chains = [masq_chain(self.network, self.subnet, self.random_fully)] if self.ip_masq else []
        return chains + ([forward_chain(self.network)] if self.forward else [])

    def names(self) -> list[str]:
        return [chain.set_name for chain in self.chains]

    def recycle(self, network: Network, subnet: Network) -> None:
        """Nothing to do: writing our chain flushes it, a previous lease's rules with it."""

    def _write(self, chains: list[Chain], listed: dict[str, Listed] | None) -> None:
        lines = [table_script(self.version)]
        for chain in chains:
            lines += chain_script(self.version, chain, (listed or {}).get(chain.name))
        self.nft.apply(lines)

    def install(self) -> None:
        try:
            self._write(self.chains, self.nft.listing(self.version))
        except NftError:
            if not (self.ip_masq and self.random_fully):
                raise
            # This kernel's NAT has no fully-random (flanneld's checkRandomfully): the
            # transaction left nothing; again with a plain masquerade.
            self.random_fully = False
            self.chains = self._chains()
            self._write(self.chains, self.nft.listing(self.version))

    def check(self) -> list[str]:
        listed = self.nft.listing(self.version)
        repaired: list[str] = []
        stale = []
        for chain in self.chains:
            found = differences(chain, (listed or {}).get(chain.name))
            if found:
                stale.append(chain)
                repaired += found
        if stale:
            self._write(stale, listed)
        self.repairs += len(repaired)
        self.checks += 1  # after the check: a watcher of this count knows one just ended
        return repaired

    def remove(self) -> None:
        """Delete our table, as flanneld does on exit (whatever is left in it)."""
        if self.nft.listing(self.version) is not None:
            family, table = TABLES[self.version]
            self.nft.apply([f"delete table {family} {table}"])

    def status(self) -> dict[str, object]:
        family, table = TABLES[self.version]
        return {
            "nft": self.nft.version,
            "table": f"{family} {table}",
            "chains": [chain.name for chain in self.chains],
            "sets": self.names(),
            "random_fully": self.random_fully,
            "checks": self.checks,
        }
