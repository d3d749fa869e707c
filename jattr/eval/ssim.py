"""Structural similarity (SSIM) of image pairs, batched.

Wang, Bovik, Sheikh & Simoncelli (2004). With a normalised Gaussian window w
(σ = 1.5) slid over every position where it fits entirely inside the image
("valid" windows), per channel,

    μ_a = w ⋆ a,   σ_a² = w ⋆ a² − μ_a²,   σ_ab = w ⋆ (a·b) − μ_a μ_b,

    SSIM map = (2 μ_a μ_b + C₁)(2 σ_ab + C₂) / ((μ_a² + μ_b² + C₁)(σ_a² + σ_b² + C₂)),

    C₁ = (k₁ L)²,  C₂ = (k₂ L)²,  k₁ = 0.01, k₂ = 0.03, L = the data range,

and SSIM(a, b) is the mean of the map over positions and channels. The paper's
window is 11×11; images smaller than that (the 8×8 digits) use the largest odd
window that fits, so the statistic stays defined. Covariances use the window
weights as given (population, not N/(N−1)-corrected).

The window is separable, so w ⋆ x = A_h x A_wᵀ with A the [H − s + 1, H] matrix
whose row i holds the 1-D Gaussian at columns i..i+s−1; one einsum per moment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def gaussian_window(size: int, sigma: float = 1.5) -> np.ndarray:
  """The normalised 1-D Gaussian of odd length ``size``, float64 [size]."""
  if size < 1 or size % 2 == 0:
    raise ValueError(f"size must be a positive odd integer, got {size}")
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2
  g = np.exp(-0.5 * (r / sigma) ** 2)
  return g / g.sum()


def window_size(height: int, width: int, max_size: int = 11) -> int:
  """The largest odd window ≤ ``max_size`` that fits an image of this size."""
  s = min(max_size, height, width)
  s = s if s % 2 == 1 else s - 1
  if s < 1:
    raise ValueError(f"images must be at least 1x1, got {height}x{width}")
  return s


def _valid_matrix(n: int, g: np.ndarray) -> np.ndarray:
  s = g.shape[0]
  out = np.zeros((n - s + 1, n))
  for i in range(n - s + 1):
    out[i, i:i + s] = g
  return out


def ssim(a: jax.Array, b: jax.Array, *, data_range: float = 2.0, max_window: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """SSIM of each pair of images (see module docstring).

  Args:
    a, b: images [B, H, W, C] (or one image [H, W, C]); jattr's images live in
      [−1, 1], hence the default ``data_range`` L = 2.
    data_range: L, the spread of possible pixel values.
    max_window: the window side before shrinking to fit (11 in the paper).
    sigma: the Gaussian's standard deviation in pixels.
    k1, k2: the stabilising constants.

  Returns:
    SSIM per pair, [B] (a scalar for one image); 1 for identical images.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
  if a.ndim not in (3, 4):
    raise ValueError(f"a and b must be images [B, H, W, C] or [H, W, C], got shape {a.shape}")
  if data_range <= 0:
    raise ValueError(f"data_range must be > 0, got {data_range}")
  single = a.ndim == 3
  if single:
    a, b = a[None], b[None]
  _, h, w, _ = a.shape
  s = window_size(h, w, max_window)
  g = gaussian_window(s, sigma)
  dtype = jnp.result_type(a.dtype, jnp.float32)
  ah = jnp.asarray(_valid_matrix(h, g), dtype)
  aw = jnp.asarray(_valid_matrix(w, g), dtype)
  a, b = a.astype(dtype), b.astype(dtype)

  def blur(x):
    return jnp.einsum("ih,bhwc,jw->bijc", ah, x, aw)

  mu_a, mu_b = blur(a), blur(b)
  var_a = blur(a * a) - mu_a**2
  var_b = blur(b * b) - mu_b**2
  cov = blur(a * b) - mu_a * mu_b
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
      (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  out = jnp.mean(smap, axis=(1, 2, 3))
  return out[0] if single else out
