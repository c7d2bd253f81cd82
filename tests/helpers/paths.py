"""Where the checkout is: the root a child process gets as PYTHONPATH (and cwd)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
