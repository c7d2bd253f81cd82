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

Its ``netlink.rtnl.iprsocket`` imports ``unittest.mock`` at module level (and with it the
whole ``unittest`` package: 1.3 MB of every daemon) for one ``Mock()`` in a class
attribute of ``IPRSocket``, a socket we never use. While that module loads it is given a
stand-in whose instances refuse to be used; the stand-in leaves sys.modules at once, so a
later ``import unittest.mock`` gets the real one.
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


class _NoMock:
    """What iprsocket's ``IPRSocket`` gets for ``mock.Mock()``: nothing of ours uses that
    class, and anything that did would fail here, by name, rather than do nothing."""

    def __getattr__(self, name: str) -> object:
        raise RuntimeError(
            f"pyroute2's IPRSocket ({name}) is not available through tun.rtnl: "
            "import pyroute2 whole before tun.rtnl to use it"
        )


def _without_unittest() -> dict[str, types.ModuleType]:
    """Stand-ins for ``unittest`` and ``unittest.mock`` that are not loaded yet (a loaded
    one is left as it is); returned so that they can be taken out again."""
    stand_ins: dict[str, types.ModuleType] = {}
    if "unittest.mock" in sys.modules:
        return stand_ins
    if "unittest" not in sys.modules:
        stand_ins["unittest"] = types.ModuleType("unittest")
        stand_ins["unittest"].__path__ = []
    mock = types.ModuleType("unittest.mock")
    mock.Mock = _NoMock  # type: ignore[attr-defined]
    stand_ins["unittest.mock"] = mock
    sys.modules.update(stand_ins)
    return stand_ins


_bare_package("pyroute2")
_stand_ins = _without_unittest()
try:
    from pyroute2 import netns  # noqa: E402 - after the bare package, as every import below
    from pyroute2.iproute.linux import IPRoute  # noqa: E402
    from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402
finally:
    for _name, _module in _stand_ins.items():
        if sys.modules.get(_name) is _module:
            del sys.modules[_name]

__all__ = ["IPRoute", "NetlinkError", "netns"]
