"""What the node asks of flanneld's ip-masq and FORWARD rules, whichever tool holds them:
the iptables chains (``ipmasq``) or flanneld's own nftables tables (``nftables``, with
EnableNFTables). flanneld calls this its traffic manager; the node picks the command
once, then only talks to these two interfaces."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

Network = IPv4Network | IPv6Network
TIMEOUT = 10.0  # seconds a rule command may take


class RulesError(OSError):
    """A rule command failed; the message says which and its first line of output."""


@dataclass(frozen=True)
class Wanted:
    """Which of flanneld's rule sets the node keeps, and how."""

    ip_masq: bool  # masquerade pod traffic leaving the overlay
    forward: bool  # accept the overlay in FORWARD
    random_fully_disable: bool = False  # --ip-masq-fully-random-disable


def run_command(
    command: list[str],
    shown: str,
    error: type[RulesError],
    *,
    stdin: str | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a rule command; ``error`` (its message starting with ``shown``) when it cannot
    run, times out or (with ``check``) fails."""
    try:
        proc = subprocess.run(
            command, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise error(62, f"{shown} timed out") from None
    except OSError as e:  # the command went away (a package removed), no process left
        raise error(e.errno or 1, f"{shown}: {e.strerror or e}") from None
    if check and proc.returncode != 0:
        text = (proc.stderr or proc.stdout).strip().splitlines()
        raise error(proc.returncode, f"{shown}: {text[0] if text else 'failed'}")
    return proc


class TrafficRules(Protocol):
    """One family's rule sets of one daemon: installed, checked and repaired, removed."""

    status_key: str  # where ``overlay status --json`` shows them ("iptables", "nftables6")
    repair_kind: str  # the ``repairs`` counter they add to
    random_fully: bool  # the masquerade randomises source ports fully
    repairs: int
    checks: int

    def names(self) -> list[str]:
        """The sets kept ("masq", "forward")."""
        ...

    def recycle(self, network: Network, subnet: Network) -> None:
        """Remove the masq rules a previous lease (network, subnet) left."""
        ...

    def install(self) -> None: ...

    def check(self) -> list[str]:
        """Re-check everything and put back what is missing; what was put back."""
        ...

    def remove(self) -> None: ...

    def status(self) -> dict[str, object]: ...


class RuleCommand(Protocol):
    """The tool that holds the rules of one family (iptables, ip6tables, nft)."""

    binary: str

    def for_ipv6(self) -> RuleCommand:
        """The same tool for IPv6 (raises RulesError when the machine has none)."""
        ...

    def rules(self, network: Network, subnet: Network, wanted: Wanted) -> TrafficRules: ...
