"""Shared fixtures: tiny synthetic shard sets built once per session in a temporary directory."""
from __future__ import annotations

from pathlib import Path

import pytest

from shards.synthetic import write_synthetic

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory) -> Path:
    """The colour task at 32 px: 96 unpaired training images per domain in shards of 40, 16 test pairs."""
    root = tmp_path_factory.mktemp("colour")
    write_synthetic(root, "colour", size=32, train=96, test=16, seed=3, maxcount=40)
    return root
