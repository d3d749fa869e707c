"""Shared test fixtures.

Float64 reference checks run inside the ``x64`` fixture (``jax.enable_x64``), a
context that is undone after the test, so float32 tests in the same process keep
float32 defaults.

Tests on the real datasets take the ``shared_data_dir`` fixture. The datasets are not
part of the repository: they sit in ``../shared/data`` beside it (locally and in CI),
or wherever ``$JATTR_DATA`` points. Where they are absent (a fresh clone) the
real-data tests are skipped, with the reason in the summary line; under ``CI=true``
they fail instead, so CI never passes without having run them.

Tests marked ``kfac_jax`` compare against kfac-jax, which only the ``kfac`` extra
installs (it pins jax 0.9.1): where ``import kfac_jax`` fails they are skipped, and
.ci/run's second stage runs them on that pinned stack (``pytest -m kfac_jax``).
"""

import os
import pathlib
from collections.abc import Mapping

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

DATA_ENV = "JATTR_DATA"
"""The loaders' data-directory variable; also where the real-data tests look first."""

SKIP_MARK = "the shared datasets are not here"
"""In every real-data skip reason; the terminal summary finds them by it."""


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
  """True where ``$CI`` is ``true`` (any case) or ``1``, as CI services set it."""
  return environ.get("CI", "").strip().lower() in ("true", "1")


def locate_shared_data(environ: Mapping[str, str] = os.environ,
                       repo: pathlib.Path = REPO) -> pathlib.Path:
  """The real datasets' folder: ``$JATTR_DATA``, else ``shared/data`` beside ``repo``.

  An empty ``$JATTR_DATA`` counts as unset, as in ``jattr.data.resolve_data_dir``.

  Raises:
    pytest.skip.Exception: the folder is absent and ``$CI`` is not true.
    pytest.fail.Exception: the folder is absent and ``$CI`` is true.
  """
  if environ.get(DATA_ENV):
    path, source = pathlib.Path(environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
  else:
    path, source = repo.parent / "shared" / "data", "the shared/data folder beside the repository"
  if path.is_dir():
    return path.absolute()
  if in_ci(environ):
    pytest.fail(
        f"the shared datasets are required in CI (CI=true) but {path} (from {source}) is not "
        f"a directory; put them at ../shared/data beside the repository or set {DATA_ENV} "
        f"to their folder", pytrace=False)
  pytest.skip(f"real-data test skipped: {SKIP_MARK} ({path}, from {source}, is not a "
              f"directory); set {DATA_ENV} to their folder to run it (CI=true makes this a "
              f"failure)")


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real datasets' folder (see ``locate_shared_data``): skips, or fails in CI."""
  return locate_shared_data()


KFAC_JAX_SKIP = "needs the kfac extra; run by .ci/run's pinned-stack stage"
"""The skip reason of the ``kfac_jax``-marked tests where kfac-jax is not installed."""


def kfac_jax_available() -> bool:
  """True where ``import kfac_jax`` works (the ``kfac`` extra is installed)."""
  try:
    import kfac_jax  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def pytest_collection_modifyitems(config, items):
  """Skips the ``kfac_jax``-marked tests where kfac-jax cannot be imported."""
  del config
  marked = [item for item in items if item.get_closest_marker("kfac_jax") is not None]
  if marked and not kfac_jax_available():
    skip = pytest.mark.skip(reason=f"{KFAC_JAX_SKIP} (pip install -e '.[kfac]')")
    for item in marked:
      item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
  """Names the real-data skips even without ``-rs``, so they are never silent."""
  reasons = []
  for report in terminalreporter.stats.get("skipped", []):
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if SKIP_MARK in reason:
      reasons.append(reason[reason.index(SKIP_MARK):])
  if reasons:
    terminalreporter.write_line(f"{len(reasons)} real-data test(s) skipped: {reasons[0]}",
                                yellow=True)


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
  """Drops JAX's compiled programs after each test module. Two full runs on jax 0.10.2
  (2026-12-01) segfaulted inside XLA:CPU's compiler at the same test of projection_test
  after some 350 earlier tests, while that file alone passed; keeping the process's
  compile caches per module is the guess being tested, not a diagnosed fix."""
  yield
  jax.clear_caches()
