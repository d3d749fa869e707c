"""Spearman rank correlation against straightforward references (scipy, loops)."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jattr.eval.spearman import pearson, rankdata, spearman


def _loop_ranks(row):
  """Average ranks by the definition: 1 + #smaller + (#equal − 1) / 2."""
  row = list(row)
  return np.array([1 + sum(v < x for v in row) + (sum(v == x for v in row) - 1) / 2
                   for x in row])


def test_rankdata_matches_definition_and_scipy_with_ties():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, size=(7, 13)).astype(np.float32)  # many ties
  got = np.asarray(rankdata(jnp.asarray(x)))
  for row, r in zip(x, got):
    np.testing.assert_allclose(r, _loop_ranks(row))
    np.testing.assert_allclose(r, scipy.stats.rankdata(row, method="average"))


def test_spearman_matches_scipy_on_ties_and_without():
  rng = np.random.default_rng(1)
  tied_x = rng.integers(0, 4, size=(20, 30)).astype(np.float64)
  tied_y = (tied_x + rng.integers(0, 3, size=(20, 30))).astype(np.float64)
  cont_x = rng.normal(size=(20, 30))
  cont_y = cont_x + rng.normal(size=(20, 30))
  for x, y in ((tied_x, tied_y), (cont_x, cont_y), (tied_x, cont_y)):
    got = np.asarray(spearman(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)))
    want = np.array([scipy.stats.spearmanr(a, b).statistic for a, b in zip(x, y)])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_spearman_is_vectorised_over_leading_axes():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(2, 3, 4, 9))
  got = np.asarray(spearman(jnp.asarray(x), jnp.asarray(y)))
  assert got.shape == (3, 4)
  np.testing.assert_allclose(got[1, 2], scipy.stats.spearmanr(x[1, 2], y[1, 2]).statistic,
                             atol=1e-5)


def test_spearman_extremes_and_constant_rows():
  x = jnp.arange(10.0)
  assert float(spearman(x, x**3)) == pytest.approx(1.0)
  assert float(spearman(x, -x)) == pytest.approx(-1.0)
  assert np.isnan(float(spearman(x, jnp.ones(10))))


def test_spearman_argument_errors():
  with pytest.raises(ValueError, match="same shape"):
    spearman(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="at least 2"):
    pearson(jnp.zeros((3, 1)), jnp.zeros((3, 1)))
