"""flanneld's iptables rules: ip-masq (``--ip-masq``) and FORWARD (``--iptables-forward-rules``).

The same chains and rules flanneld installs, so an operator's iptables knowledge (and
tooling) carries over:

- nat: ``POSTROUTING -j FLANNEL-POSTRTG`` inserted first, then in FLANNEL-POSTRTG:
  RETURN for kube-proxy's mark 0x4000/0x4000 (no double NAT), RETURN for traffic between
  our lease and the network either way (inside the overlay), RETURN for traffic from
  outside the network to our lease, MASQUERADE (``--random-fully`` where iptables has it)
  for traffic from the network leaving it (multicast excepted), and for traffic from the
  host into the network.
- filter: ``FORWARD -j FLANNEL-FWD`` appended, FLANNEL-FWD accepting the network as source
  and as destination, so a DROP policy (Docker's) does not break forwarding silently.

With EnableIPv6 the same two sets go into ip6tables for the IPv6 network and lease, as
flanneld's masqIP6Rules and forwardRules make them (multicast there is ff00::/8).

The rules are installed idempotently, re-checked every ``--iptables-resync`` seconds
(a missing rule makes the chain's rules be rewritten in order, as flanneld does, but in
one ``iptables-restore --noflush`` transaction, so no packet ever sees a MASQUERADE
without the RETURNs before it), and removed on shutdown; a chain is deleted only if we
created it. Rules of the previous
lease (a different network or subnet in the previous subnet.env) are removed first, as
flanneld's recycleIPTables does. The ``iptables`` command is used (iptables-nft or
legacy, whichever the machine's alternative is), not netlink: these are the rules an
operator lists with ``iptables-save``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from overlay.kernel.traffic import Network, RuleCommand, RulesError, Wanted, run_command

KUBE_PROXY_MARK = "0x4000/0x4000"
MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
MASQ_CHAIN = "FLANNEL-POSTRTG"
FORWARD_CHAIN = "FLANNEL-FWD"
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}


class IptablesError(RulesError):
    """An iptables command failed; the message is its first line of output."""


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]
    first: bool = False  # inserted at the top of the chain (else appended)

    def describe(self) -> str:
        return f"-t {self.table} -A {self.chain} {' '.join(self.spec)}"


def masq_rules(network: Network, subnet: Network, random_fully: bool) -> list[Rule]:
    net, sub = str(network), str(subnet)
    comment = ("-m", "comment", "--comment", MASQ_COMMENT)
    masquerade = ("-j", "MASQUERADE", *(("--random-fully",) if random_fully else ()))

    def rule(*spec: str) -> Rule:
        return Rule("nat", MASQ_CHAIN, spec)

    return [
        Rule("nat", "POSTROUTING", (*comment, "-j", MASQ_CHAIN), first=True),
        rule("-m", "mark", "--mark", KUBE_PROXY_MARK, *comment, "-j", "RETURN"),
        rule("-s", sub, "-d", net, *comment, "-j", "RETURN"),
        rule("-s", net, "-d", sub, *comment, "-j", "RETURN"),
        rule("!", "-s", net, "-d", sub, *comment, "-j", "RETURN"),
        rule("-s", net, "!", "-d", MULTICAST[network.version], *comment, *masquerade),
        rule("!", "-s", net, "-d", net, *comment, *masquerade),
    ]


def forward_rules(network: Network) -> list[Rule]:
    comment = ("-m", "comment", "--comment", FORWARD_COMMENT)
    return [
        Rule("filter", "FORWARD", (*comment, "-j", FORWARD_CHAIN)),
        Rule("filter", FORWARD_CHAIN, ("-s", str(network), *comment, "-j", "ACCEPT")),
        Rule("filter", FORWARD_CHAIN, ("-d", str(network), *comment, "-j", "ACCEPT")),
    ]


class Iptables:
    """The machine's ``iptables`` command."""

    def __init__(self, binary: str = "iptables") -> None:
        path, restore = shutil.which(binary), shutil.which(f"{binary}-restore")
        if path is None or restore is None:
            raise IptablesError(2, f"no {binary} and {binary}-restore commands: install iptables")
        self.binary = binary
        self.path, self.restore_path = path, restore
        self.version = self._run("--version").stdout.strip()

    def for_ipv6(self) -> RuleCommand:
        return Iptables("ip6tables")

    def rules(self, network: Network, subnet: Network, wanted: Wanted) -> IptablesRules:
        return IptablesRules(self, network, subnet, wanted)

    def _run(
        self, *args: str, check: bool = True, restore: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [self.restore_path if restore is not None else self.path, *args]
        name = f"{self.binary}-restore" if restore is not None else self.binary
        shown = " ".join([name, *args])
        return run_command(command, shown, IptablesError, stdin=restore, check=check)

    @property
    def random_fully(self) -> bool:
        """iptables 1.6.2 and later know MASQUERADE --random-fully (go-iptables' test)."""
        found = re.search(r"v(\d+)\.(\d+)\.(\d+)", self.version)
        return found is not None and tuple(map(int, found.groups())) >= (1, 6, 2)

    def exists(self, rule: Rule) -> bool:
        proc = self._run("-w", "5", "-t", rule.table, "-C", rule.chain, *rule.spec, check=False)
        return proc.returncode == 0

    def add(self, rule: Rule) -> None:
        where = ("-I", rule.chain, "1") if rule.first else ("-A", rule.chain)
        self._run("-w", "5", "-t", rule.table, *where, *rule.spec)

    def delete(self, rule: Rule) -> None:
        while self.exists(rule):  # a rule added twice (by hand, by an old run) goes too
            self._run("-w", "5", "-t", rule.table, "-D", rule.chain, *rule.spec)

    def has_chain(self, table: str, chain: str) -> bool:
        return self._run("-w", "5", "-t", table, "-S", chain, check=False).returncode == 0

    def write_chain(self, table: str, chain: str, rules: list[Rule]) -> None:
        """Create ``chain`` or replace its rules with ``rules``, in one transaction (the
        jumps into it, elsewhere in the table, are kept)."""
        lines = [f"*{table}", f":{chain} - [0:0]"]
        lines += [f"-A {chain} {' '.join(_quoted(rule.spec))}" for rule in rules]
        self._run("-w", "5", "--noflush", restore="\n".join([*lines, "COMMIT", ""]))

    def delete_chain(self, table: str, chain: str) -> bool:
        """Delete an empty chain; False (and nothing done) when it still has rules."""
        return self._run("-w", "5", "-t", table, "-X", chain, check=False).returncode == 0

    def drop_chain(self, table: str, chain: str, jumps: list[Rule]) -> bool:
        """Delete ``jumps`` (rules that exist and lead into ``chain``), then flush and
        delete ``chain``, in one transaction; False (and nothing done) if it fails."""
        lines = [f"*{table}"]
        lines += [f"-D {rule.chain} {' '.join(_quoted(rule.spec))}" for rule in jumps]
        lines += [f"-F {chain}", f"-X {chain}", "COMMIT", ""]
        proc = self._run("-w", "5", "--noflush", restore="\n".join(lines), check=False)
        return proc.returncode == 0


@dataclass
class RuleSet:
    """One of flanneld's rule sets, kept installed."""

    name: str  # "masq" or "forward"
    chain: tuple[str, str]  # (table, chain) the set's own rules live in
    rules: list[Rule]
    created_chain: bool = False

    def install(self, ipt: Iptables) -> list[Rule]:
        """Make every rule present (in order); the rules that had to be added."""
        table, chain = self.chain
        own = [rule for rule in self.rules if (rule.table, rule.chain) == self.chain]
        if not ipt.has_chain(table, chain):
            ipt.write_chain(table, chain, own)
            self.created_chain = True
            absent = list(own)
        else:
            absent = [rule for rule in own if not ipt.exists(rule)]
            if absent:  # order matters (RETURNs before MASQUERADE): rewrite the chain
                ipt.write_chain(table, chain, own)
        for rule in self.rules:
            if rule not in own and not ipt.exists(rule):
                ipt.add(rule)  # a jump into our chain, after the chain is complete
                absent.append(rule)
        return absent

    def remove(self, ipt: Iptables) -> None:
        """Our chain (if we made it) and the jumps into it go in one transaction (a
        dozen iptables calls, one per rule, took 0.3-0.6 s and ran out of the stop
        budget on a loaded machine); in a chain we did not make, only our rules go."""
        table, chain = self.chain
        jumps = [rule for rule in self.rules if (rule.table, rule.chain) != self.chain]
        if self.created_chain:
            present = [rule for rule in jumps if ipt.exists(rule)]
            if ipt.drop_chain(table, chain, present):
                for rule in jumps:
                    ipt.delete(rule)  # a jump added twice (by hand, by an old run) goes too
                return
        for rule in self.rules:
            ipt.delete(rule)
        if self.created_chain:
            ipt.delete_chain(table, chain)


def _quoted(spec: tuple[str, ...]) -> list[str]:
    """iptables-restore's quoting: an argument with spaces (a comment) in double quotes."""
    return [f'"{arg}"' if " " in arg else arg for arg in spec]


class IptablesRules:
    """Both rule sets of one daemon in one family: install, periodic check and repair,
    removal (a ``TrafficRules``)."""

    repair_kind = "iptables"

    def __init__(self, ipt: Iptables, network: Network, subnet: Network, wanted: Wanted) -> None:
        """``wanted.random_fully_disable``: flanneld's --ip-masq-fully-random-disable, a
        plain MASQUERADE even where iptables knows --random-fully."""
        self.ipt = ipt
        self.status_key = ipt.binary
        self.network, self.subnet = network, subnet
        self.random_fully = ipt.random_fully and not wanted.random_fully_disable
        self.sets: list[RuleSet] = []
        if wanted.ip_masq:
            rules = masq_rules(network, subnet, self.random_fully)
            self.sets.append(RuleSet("masq", ("nat", MASQ_CHAIN), rules))
        if wanted.forward:
            self.sets.append(RuleSet("forward", ("filter", FORWARD_CHAIN), forward_rules(network)))
        self.repairs = 0
        self.checks = 0

    def names(self) -> list[str]:
        return [s.name for s in self.sets]

    def recycle(self, network: Network, subnet: Network) -> None:
        """Remove the masq rules of a previous lease that differs from ours."""
        current = {rule for s in self.sets for rule in s.rules}
        for rule in masq_rules(network, subnet, self.random_fully):
            if rule not in current and rule.chain == MASQ_CHAIN:
                self.ipt.delete(rule)

    def install(self) -> None:
        for rule_set in self.sets:
            try:
                rule_set.install(self.ipt)
            except IptablesError:
                if rule_set.name != "masq" or not self.random_fully:
                    raise
                # iptables knows --random-fully but this kernel's NAT does not: without it.
                rule_set.remove(self.ipt)
                self.random_fully = False
                rule_set.rules = masq_rules(self.network, self.subnet, False)
                rule_set.install(self.ipt)

    def check(self) -> list[str]:
        """Re-check every rule and put back what is missing; what was put back."""
        repaired: list[str] = []
        for rule_set in self.sets:
            absent = rule_set.install(self.ipt)
            repaired += [rule.describe() for rule in absent]
        self.repairs += len(repaired)
        self.checks += 1  # after the check: a watcher of this count knows one just ended
        return repaired

    def remove(self) -> None:
        for rule_set in reversed(self.sets):
            rule_set.remove(self.ipt)

    def status(self) -> dict[str, object]:
        return {
            "iptables": self.ipt.version,
            "sets": [s.name for s in self.sets],
            "random_fully": self.random_fully,
            "checks": self.checks,
        }
