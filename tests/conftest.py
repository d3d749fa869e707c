"""Shared test fixtures.

Float64 reference checks run inside the ``x64`` fixture (``jax.enable_x64``), a
context that is undone after the test, so float32 tests in the same process keep
float32 defaults.
"""

import os
import pathlib

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real datasets: $JATTR_DATA, else ../shared/data beside the repo (as in CI)."""
  path = pathlib.Path(os.environ.get("JATTR_DATA", REPO.parent / "shared" / "data"))
  if not path.is_dir():
    raise FileNotFoundError(
        f"real-data tests need the shared datasets at {path}; set JATTR_DATA to their folder")
  return path
