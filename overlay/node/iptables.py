"""flanneld's iptables rules on this node (``overlay.kernel.ipmasq``): whether they are
wanted, installed once the lease is known, re-checked and repaired every
``--iptables-resync`` seconds, and removed at stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from control.subnet_env import SubnetEnv
from overlay.kernel.ipmasq import Iptables, IptablesError, IptablesRules, Network
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
        self.rules: IptablesRules | None = None  # IPv4 (iptables), until removed
        self.rules6: IptablesRules | None = None  # IPv6 (ip6tables) with EnableIPv6
        self._installing: list[IptablesRules] = []  # being installed (a stop removes them)

    def command(self) -> Iptables | None:
        """The iptables command, if rules are wanted: --ip-masq needs it, the default
        FORWARD rules are skipped with one warning where there is none."""
        if not (self.options.ip_masq or self.options.forward_rules):
            return None
        try:
            return Iptables()
        except IptablesError as e:
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
        ipt: Iptables,
        network: IPv4Network,
        subnet: IPv4Network,
        previous: SubnetEnv | None,
        ipv6: tuple[IPv6Network, IPv6Network] | None = None,
    ) -> None:
        """The rules for our lease; with --ip-masq, those of the previous lease (from the
        last subnet.env) are replaced. ``ipv6``: (IPv6Network, our IPv6 subnet) with
        EnableIPv6, whose rules go into ip6tables."""
        old = (previous.network, previous.subnet.network) if previous is not None else None
        self.rules = await self._install(ipt, network, subnet, old)
        if ipv6 is None:
            return
        try:
            ipt6 = Iptables("ip6tables")
        except IptablesError as e:
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
        ipt: Iptables,
        network: Network,
        subnet: Network,
        previous: tuple[Network, Network] | None,
    ) -> IptablesRules | None:
        """One family's rules installed, or None when the FORWARD ones failed (warned)."""
        masq = self.options.ip_masq
        rules = IptablesRules(
            ipt,
            network,
            subnet,
            ip_masq=masq,
            forward=self.options.forward_rules,
            random_fully_disable=self.options.random_fully_disable,
        )

        def install() -> None:
            if previous is not None and masq and previous != (network, subnet):
                rules.recycle(*previous)
            rules.install()

        # Known before they exist: a stop during the install removes them.
        self._installing.append(rules)
        try:
            await asyncio.to_thread(install)
        except IptablesError as e:
            await asyncio.to_thread(rules.remove)
            if masq:
                raise Fatal(f"installing the ip-masq rules: {e.strerror}") from None
            self.log.warning("forward_rules_skipped", reason=e.strerror)
            return None
        finally:
            self._installing.remove(rules)
        self.log.info(
            "iptables_rules_installed",
            command=ipt.binary,
            sets=[s.name for s in rules.sets],
            random_fully=rules.random_fully,
            resync_s=self.options.resync,
        )
        return rules

    def installed(self) -> list[IptablesRules]:
        """Every rule set of ours that may exist, IPv4 first."""
        found = [r for r in (self.rules, self.rules6) if r is not None]
        return found + [r for r in self._installing if r not in found]

    async def keep(self) -> None:
        """Re-check (and repair) the rules every --iptables-resync seconds, forever."""
        installed = self.installed()
        if not installed:
            await asyncio.Event().wait()
            return
        failing = False
        while True:
            await asyncio.sleep(self.options.resync)
            try:
                repaired = [
                    line for rules in installed for line in await asyncio.to_thread(rules.check)
                ]
            except IptablesError as e:
                if not failing:
                    self.log.error("iptables_check_failed", error=e.strerror)
                failing = True
                continue
            failing = False
            for rule in repaired:
                self.log.warning("iptables_rule_repaired", rule=rule)

    async def remove(self) -> None:
        for rules in reversed(self.installed()):
            await asyncio.to_thread(rules.remove)
