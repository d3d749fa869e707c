"""Per-example gradients against a Python loop of jax.grad (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jattr.grads import per_example as pe


def fn(params, example):
  """A scalar of ONE example: a tiny two-layer net on a (x [3], y) pair."""
  x, y = example
  h = jnp.tanh(x @ params["a"]["w"] + params["a"]["b"])
  return jnp.sum(jnp.square(h @ params["out"] - y)) + 0.1 * jnp.sum(jnp.abs(params["out"]))


@pytest.fixture
def problem(x64):
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape))
  params = {"a": {"w": normal(3, 4), "b": normal(4)}, "out": normal(4, 2)}
  n = 7
  examples = (normal(n, 3), normal(n, 2))
  loop = [jax.grad(fn)(params, jax.tree_util.tree_map(lambda e: e[i], examples))
          for i in range(n)]
  return params, examples, loop


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 100])
def test_matches_loop(problem, chunk_size):
  params, examples, loop = problem
  grads = pe.per_example_grads(fn, params, examples, chunk_size=chunk_size)
  for i, g in enumerate(loop):
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-12, atol=1e-13), grads, g)


def test_flatten_order_is_ravel_pytree(problem):
  params, examples, loop = problem
  flat = pe.per_example_flat_grads(fn, params, examples, chunk_size=3)
  assert flat.shape == (7, 3 * 4 + 4 + 4 * 2)
  want = np.stack([ravel_pytree(g)[0] for g in loop])
  np.testing.assert_allclose(flat, want, rtol=1e-12, atol=1e-13)
  # Chunked (3) and unchunked differ only by the batching of float64 matmuls.
  np.testing.assert_allclose(
      pe.flatten_per_example(pe.per_example_grads(fn, params, examples)), flat,
      rtol=1e-12, atol=1e-13)


def test_jit_and_errors(problem):
  params, examples, loop = problem
  jitted = jax.jit(lambda p, e: pe.per_example_flat_grads(fn, p, e, chunk_size=2))
  np.testing.assert_allclose(jitted(params, examples)[6], ravel_pytree(loop[6])[0], rtol=1e-13)
  with pytest.raises(ValueError, match="same leading axis N"):
    pe.per_example_grads(fn, params, (examples[0], examples[1][:3]), chunk_size=2)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    pe.per_example_grads(fn, params, examples, chunk_size=0)
