"""Which codecs the dataplane runs: the native module ``encap._native`` (C, built by
``pip install`` from encap/csrc/) when it loads, else the pure-Python reference in
``encap.tso``, ``encap.gso`` and ``encap.ipv6``.

The two implement the same functions with the same results, byte for byte and drop for
drop (tests/encap/test_native.py proves it on random and malformed input); the reference
stays the description of the rules and the test oracle. ``OVERLAY_NATIVE=0`` in the
environment selects the reference (to measure it, or to rule the native module out);
``OVERLAY_NATIVE_LIB=path/to/_native....so`` loads another build of the module (the
sanitizer builds of ``make asan`` and ``make fuzz``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from encap import gso, ipv6, tso


def _load() -> ModuleType:
    """The extension: the one built next to this file, or (sanitizer builds: make asan,
    make fuzz) the file ``OVERLAY_NATIVE_LIB`` names."""
    if os.environ.get("OVERLAY_NATIVE", "1") == "0":
        raise ImportError("OVERLAY_NATIVE=0 in the environment")
    path = os.environ.get("OVERLAY_NATIVE_LIB")
    if not path:
        from encap import _native

        return _native
    spec = importlib.util.spec_from_file_location("encap._native", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"OVERLAY_NATIVE_LIB={path} is not an extension module")
    module = importlib.util.module_from_spec(spec)
    sys.modules["encap._native"] = module
    spec.loader.exec_module(module)
    return module


_module: ModuleType | None
LOAD_ERROR: str | None
try:
    _module = _load()
    LOAD_ERROR = None
except ImportError as e:  # not built (no compiler at install time) or refused to load
    _module = None
    LOAD_ERROR = str(e)

AVAILABLE = _module is not None

# The functions the dataplane calls, from the native module when it loaded.
segment_tcp4: Callable[..., tuple[int, int, int]] = (
    _module.segment_tcp4 if _module else tso.segment_tcp4
)
segment_tcp6: Callable[..., tuple[int, int, int]] = (
    _module.segment_tcp6 if _module else tso.segment_tcp6
)
finish_checksums: Callable[..., None] = (
    _module.finish_checksums if _module else tso.finish_checksums
)
drop_reason: Callable[..., str | None] = _module.drop_reason if _module else gso.drop_reason
plan_groups: Callable[..., list[tuple[int, int]]] = (
    _module.plan_groups if _module else gso.plan_groups
)
valid_pieces: Callable[..., list[tuple[int, int]]] = (
    _module.valid_pieces if _module else gso.valid_pieces
)
plan_tun_writes: Callable[..., list[tuple[Any, int, int]]] = (
    _module.plan_tun_writes if _module else gso.plan_tun_writes
)
valid_pieces6: Callable[..., list[tuple[int, int]]] = (
    _module.valid_pieces6 if _module else ipv6.valid_pieces6
)
plan_tun_writes6: Callable[..., list[tuple[Any, int, int]]] = (
    _module.plan_tun_writes6 if _module else ipv6.plan_tun_writes6
)
# Native only (None without it): the dataplane's reader callbacks in C.
# ``Drains(dataplane, budget)`` reads the fixed attributes of an
# overlay.dataplane.udp.UdpDataplane once; its ``tx()`` is the dataplane's on_tun_readable
# and ``rx()`` its on_socket_readable_gro (on_socket_readable) with everything they call,
# for a wake-up without a trace. Counts go to the dataplane's counters and its peers'
# stats at ``flush()``; drops at once.
Drains: Any = _module.Drains if _module else None


def module() -> ModuleType:
    """The native module itself (for the differential tests); ImportError without it."""
    if _module is None:
        raise ImportError(f"encap._native is not available: {LOAD_ERROR}")
    return _module
