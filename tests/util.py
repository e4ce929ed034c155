"""Helpers the tests share: settings for pure-function tests, and writing config files for runs."""

from __future__ import annotations

import pprint
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import misp2defender as m2d  # noqa: E402

BASE_CONFIG: dict[str, Any] = {
    "graph_auth": {"tenant": "7f3c1e2a-5b8d-4c6e-9a0f-1d2e3f4a5b6c", "client_id": "test-client",
                   "client_secret": "test-secret"},
    "misp_domain": "http://127.0.0.1:1/",
    "misp_key": "test-misp-key",
}


def make_settings(**overrides: Any) -> m2d.Settings:
    """Settings from the base config plus overrides, validated by the real loader."""
    return m2d.build_settings({**BASE_CONFIG, **overrides}, environ={})


def write_config(path: Path, values: dict[str, Any]) -> Path:
    """Write a config.py the way a user would, one assignment per line."""
    lines = [f"{name} = {pprint.pformat(value, width=100)}" for name, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
