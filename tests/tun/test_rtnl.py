"""tun.rtnl: pyroute2's rtnetlink client without the rest of the library."""

from __future__ import annotations

import pytest

from tests.helpers.modules import loaded_after


@pytest.mark.parametrize("whole_first", [False, True])
def test_rtnl_speaks_netlink_with_or_without_the_whole_library(whole_first: bool) -> None:
    """tun.rtnl's IPRoute dumps this namespace's links; a pyroute2 imported whole before
    it is the one used (so a program that needs the rest of pyroute2 still has it)."""
    loaded = loaded_after(
        ("import pyroute2\n" if whole_first else "")
        + "from tun.rtnl import IPRoute, NetlinkError\n"
        "with IPRoute() as ipr:\n"
        "    names = [link.get_attr('IFLA_IFNAME') for link in ipr.get_links()]\n"
        "assert 'lo' in names, names\n"
        "assert issubclass(NetlinkError, Exception)"
    )
    assert ("pyroute2.ndb.main" in loaded) is whole_first


def test_rtnl_leaves_unittest_out_and_the_real_mock_to_a_later_import() -> None:
    """iprsocket's ``unittest.mock`` is a stand-in only while tun.rtnl loads: unittest is
    not loaded after it, and an import after it gets the real ``Mock``."""
    loaded = loaded_after(
        "import tun.rtnl\n"
        "assert 'unittest' not in sys.modules and 'unittest.mock' not in sys.modules\n"
        "from unittest import mock\n"
        "assert mock.Mock().anything is not None\n"
        "assert mock.Mock.__module__ == 'unittest.mock'"
    )
    assert "unittest.case" in loaded
