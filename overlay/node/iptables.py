"""flanneld's iptables rules on this node (``overlay.kernel.ipmasq``): whether they are
wanted, installed once the lease is known, re-checked and repaired every
``--iptables-resync`` seconds, and removed at stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any

from control.subnet_env import SubnetEnv
from overlay.kernel.ipmasq import Iptables, IptablesError, IptablesRules
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
        self.rules: IptablesRules | None = None  # set before they exist, until removed

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
    ) -> None:
        """The rules for our lease; with --ip-masq, those of the previous lease (from the
        last subnet.env) are replaced."""
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
            if previous is not None and masq:
                old = previous.subnet.network
                if (previous.network, old) != (network, subnet):
                    rules.recycle(previous.network, old)
            rules.install()

        self.rules = rules  # before they exist: a stop during the install removes them
        try:
            await asyncio.to_thread(install)
        except IptablesError as e:
            self.rules = None
            await asyncio.to_thread(rules.remove)
            if masq:
                raise Fatal(f"installing the ip-masq rules: {e.strerror}") from None
            self.log.warning("forward_rules_skipped", reason=e.strerror)
            return
        self.log.info(
            "iptables_rules_installed",
            sets=[s.name for s in rules.sets],
            random_fully=rules.random_fully,
            resync_s=self.options.resync,
        )

    async def keep(self) -> None:
        """Re-check (and repair) the rules every --iptables-resync seconds, forever."""
        rules = self.rules
        if rules is None:
            await asyncio.Event().wait()
            return
        failing = False
        while True:
            await asyncio.sleep(self.options.resync)
            try:
                repaired = await asyncio.to_thread(rules.check)
            except IptablesError as e:
                if not failing:
                    self.log.error("iptables_check_failed", error=e.strerror)
                failing = True
                continue
            failing = False
            for rule in repaired:
                self.log.warning("iptables_rule_repaired", rule=rule)

    async def remove(self) -> None:
        if self.rules is not None:
            await asyncio.to_thread(self.rules.remove)
