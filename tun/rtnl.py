"""pyroute2's rtnetlink client (``IPRoute``, ``NetlinkError``, ``netns``) without the rest
of pyroute2: every module of ours that speaks netlink imports it from here.

``import pyroute2`` (and so ``from pyroute2.iproute import IPRoute``, which runs the
package's ``__init__`` first) imports every family the library knows: conntrack,
nftables, ipset, wireguard, nl80211, devlink, plan9, and NDB with sqlite3 and psutil.
That was 7 MB of every daemon's 30 MB of Python objects (README, "Memory of a daemon").
Its submodules import each other by their full names, never through the package's own
namespace, so the package is entered here as a bare package object (its path, not its
``__init__``) and only the rtnetlink modules load. If something imported pyroute2 whole
before us, that one is used as it is.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def _bare_package(name: str) -> None:
    """Put package ``name`` in sys.modules without running its ``__init__``, so that
    importing one of its submodules loads that submodule and what it imports only."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not installed as a package")
    package = types.ModuleType(name)
    package.__spec__ = spec
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__package__ = name
    sys.modules[name] = package


_bare_package("pyroute2")

from pyroute2 import netns  # noqa: E402 - after the bare package, as every import below
from pyroute2.iproute.linux import IPRoute  # noqa: E402
from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402

__all__ = ["IPRoute", "NetlinkError", "netns"]
