"""SSIM against a per-window loop reference in float64."""

import jax.numpy as jnp
import numpy as np
import pytest

from jattr.eval.ssim import gaussian_window, ssim, window_size


def _reference(a, b, data_range=2.0, max_window=11, sigma=1.5):
  """Loops over every valid window position and channel, straight from the paper."""
  h, w, c = a.shape
  s = window_size(h, w, max_window)
  g = gaussian_window(s, sigma)
  win = np.outer(g, g)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  vals = []
  for ch in range(c):
    for i in range(h - s + 1):
      for j in range(w - s + 1):
        pa, pb = a[i:i + s, j:j + s, ch], b[i:i + s, j:j + s, ch]
        ma, mb = np.sum(win * pa), np.sum(win * pb)
        va = np.sum(win * (pa - ma) ** 2)
        vb = np.sum(win * (pb - mb) ** 2)
        cov = np.sum(win * (pa - ma) * (pb - mb))
        vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) /
                    ((ma**2 + mb**2 + c1) * (va + vb + c2)))
  return float(np.mean(vals))


@pytest.mark.parametrize("shape", [(8, 8, 1), (12, 10, 3), (5, 5, 1)])
def test_ssim_matches_loop_reference(shape, x64):
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, size=(3,) + shape)
  b = np.clip(a + 0.3 * rng.normal(size=a.shape), -1, 1)
  got = np.asarray(ssim(jnp.asarray(a), jnp.asarray(b)))
  want = [_reference(x, y) for x, y in zip(a, b)]
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_ssim_identity_symmetry_and_single_image():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.uniform(-1, 1, size=(2, 16, 16, 1)), jnp.float32)
  b = jnp.asarray(rng.uniform(-1, 1, size=(2, 16, 16, 1)), jnp.float32)
  np.testing.assert_allclose(np.asarray(ssim(a, a)), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ssim(a, b)), np.asarray(ssim(b, a)),
                             atol=1e-6)
  assert ssim(a[0], b[0]).shape == ()
  assert float(ssim(a[0], b[0])) < 0.5


def test_ssim_argument_errors():
  with pytest.raises(ValueError, match="same shape"):
    ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 9, 1)))
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    ssim(jnp.zeros((8, 8)), jnp.zeros((8, 8)))
  with pytest.raises(ValueError, match="odd"):
    gaussian_window(4)
