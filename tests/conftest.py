"""Shared test fixtures. Golden reference data lives in ../shared/golden beside the checkout
(override with $DS4TP_GOLDEN); tests that need it skip with a clear reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

from ds4tp.kernels import triton_defaults  # noqa: E402

triton_defaults()      # the Triton settings the CLI applies (kernels compiled in tests match)


def golden_dir() -> Path:
    return Path(os.environ.get("DS4TP_GOLDEN", REPO.parent / "shared" / "golden"))


def golden_file(name: str) -> Path:
    p = golden_dir() / name
    if not p.exists():
        pytest.skip(f"golden reference {p} not present (set DS4TP_GOLDEN or place shared/golden "
                    f"beside the checkout)")
    return p


@pytest.fixture(scope="session")
def golden():
    return golden_file
