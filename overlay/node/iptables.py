"""flanneld's ip-masq and FORWARD rules on this node: whether they are wanted, in which
tool (its iptables chains, ``overlay.kernel.ipmasq``, or with EnableNFTables its own
nftables tables, ``overlay.kernel.nftables``), installed once the lease is known,
re-checked and repaired every ``--iptables-resync`` seconds, and removed at stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from control.subnet_env import SubnetEnv
from overlay.kernel.ipmasq import Iptables
from overlay.kernel.nftables import Nft
from overlay.kernel.traffic import Network, RuleCommand, RulesError, TrafficRules, Wanted
from overlay.node.fatal import Fatal


@dataclass(frozen=True)
class IptablesOptions:
    ip_masq: bool = False  # masquerade pod traffic leaving the overlay (FLANNEL-POSTRTG)
    forward_rules: bool = True  # accept the overlay in FORWARD (FLANNEL-FWD)
    resync: int = 5  # seconds between checks
    random_fully_disable: bool = False  # plain MASQUERADE (--ip-masq-fully-random-disable)


class IptablesKeeper:
    def __init__(self, options: IptablesOptions, log: Any) -> None:
        self.options = options
        self.log = log
        self.rules: TrafficRules | None = None  # IPv4, until removed
        self.rules6: TrafficRules | None = None  # IPv6, with EnableIPv6
        self._installing: list[TrafficRules] = []  # being installed (a stop removes them)

    def command(self, nftables: bool = False) -> RuleCommand | None:
        """The command, if rules are wanted (``nftables``: the config's EnableNFTables,
        nft in place of iptables): --ip-masq needs it, the default FORWARD rules are
        skipped with one warning where there is none."""
        if not (self.options.ip_masq or self.options.forward_rules):
            return None
        try:
            return Nft() if nftables else Iptables()
        except RulesError as e:
            if self.options.ip_masq:
                raise Fatal(f"--ip-masq: {e.strerror}") from None
            self.log.warning(
                "forward_rules_skipped",
                reason=e.strerror,
                effect="a FORWARD policy of DROP would block the overlay",
            )
            return None

    async def install(
        self,
        ipt: RuleCommand,
        ipv4: tuple[IPv4Network, IPv4Network] | None,
        previous: SubnetEnv | None,
        ipv6: tuple[IPv6Network, IPv6Network] | None = None,
    ) -> None:
        """The rules for our lease; with --ip-masq, those of the previous lease (from the
        last subnet.env) are replaced. ``ipv4``: (Network, our subnet), None when IPv6
        only (EnableIPv4 false: no IPv4 rules at all, as flanneld); ``ipv6``: (IPv6Network,
        our IPv6 subnet) with EnableIPv6, whose rules go into ip6tables (or nftables' ip6
        table)."""
        if ipv4 is not None:
            old = None
            if previous is not None and previous.network and previous.subnet:
                old = (previous.network, previous.subnet.network)
            self.rules = await self._install(ipt, *ipv4, old)
        if ipv6 is None:
            return
        try:
            ipt6 = ipt.for_ipv6()
        except RulesError as e:
            if self.options.ip_masq:
                raise Fatal(f"--ip-masq with EnableIPv6: {e.strerror}") from None
            self.log.warning("forward_rules_skipped", family="ipv6", reason=e.strerror)
            return
        old6 = None
        if previous is not None and previous.ipv6_network and previous.ipv6_subnet:
            old6 = (previous.ipv6_network, previous.ipv6_subnet.network)
        self.rules6 = await self._install(ipt6, *ipv6, old6)

    async def _install(
        self,
        ipt: RuleCommand,
        network: Network,
        subnet: Network,
        previous: tuple[Network, Network] | None,
    ) -> TrafficRules | None:
        """One family's rules installed, or None when the FORWARD ones failed (warned)."""
        masq = self.options.ip_masq
        wanted = Wanted(masq, self.options.forward_rules, self.options.random_fully_disable)
        rules = ipt.rules(network, subnet, wanted)

        def install() -> None:
            if previous is not None and masq and previous != (network, subnet):
                rules.recycle(*previous)
            rules.install()

        # Known before they exist: a stop during the install removes them.
        self._installing.append(rules)
        try:
            await asyncio.to_thread(install)
        except RulesError as e:
            await asyncio.to_thread(rules.remove)
            if masq:
                raise Fatal(f"installing the ip-masq rules: {e.strerror}") from None
            self.log.warning("forward_rules_skipped", reason=e.strerror)
            return None
        finally:
            self._installing.remove(rules)
        self.log.info(
            f"{rules.repair_kind}_rules_installed",
            command=ipt.binary,
            sets=rules.names(),
            random_fully=rules.random_fully,
            resync_s=self.options.resync,
        )
        return rules

    def kept(self) -> list[TrafficRules]:
        """The rule sets installed and kept, IPv4 first."""
        return [r for r in (self.rules, self.rules6) if r is not None]

    def installed(self) -> list[TrafficRules]:
        """Every rule set of ours that may exist, IPv4 first."""
        found = self.kept()
        return found + [r for r in self._installing if r not in found]

    async def keep(self) -> None:
        """Re-check (and repair) the rules every --iptables-resync seconds, forever."""
        installed = self.installed()
        if not installed:
            await asyncio.Event().wait()
            return
        kind = installed[0].repair_kind  # one tool for both families
        failing = False
        while True:
            await asyncio.sleep(self.options.resync)
            try:
                repaired = [
                    line for rules in installed for line in await asyncio.to_thread(rules.check)
                ]
            except RulesError as e:
                if not failing:
                    self.log.error(f"{kind}_check_failed", error=e.strerror)
                failing = True
                continue
            failing = False
            for rule in repaired:
                self.log.warning(f"{kind}_rule_repaired", rule=rule)

    async def remove(self) -> None:
        for rules in reversed(self.installed()):
            await asyncio.to_thread(rules.remove)
