"""The status socket's answer is encoded in slices (issue 19: tens of thousands of peers
are not one long pause of the event loop); the slices must still be the same JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest

from overlay.observe.status_socket import PIECE_ROWS, json_pieces


@pytest.mark.parametrize("rows", [0, 1, PIECE_ROWS, PIECE_ROWS + 1, 3 * PIECE_ROWS + 7])
@pytest.mark.parametrize("rest", [{}, {"state": "ready", "counters": {"drops": {"x": 1}}}])
def test_the_pieces_join_into_the_document(rows: int, rest: dict[str, Any]) -> None:
    doc = {**rest, "peers": [{"subnet": f"10.0.{i}.0/24", "tx": i} for i in range(rows)]}
    pieces = list(json_pieces(doc))
    assert json.loads(b"".join(pieces)) == doc
    assert len(pieces) == (1 if rows <= PIECE_ROWS else 2 + -(-rows // PIECE_ROWS))


def test_a_document_without_peers_is_one_piece() -> None:
    doc = {"state": "starting", "registry": {"kind": "file"}}
    assert list(json_pieces(doc)) == [json.dumps(doc).encode()]
