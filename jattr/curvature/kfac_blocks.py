"""kfac-jax curvature blocks jattr registers for weight-shared layers.

``fit_kfac`` (``jattr.curvature.kfac``) hands these to kfac-jax's block-diagonal
estimator in place of its own:

- ``Conv2DExpand``: kfac-jax's expand conv block (A from the layer's input patches,
  scaled by the number of locations), with the patches extracted explicitly,
  ``PATCH_CHUNK_BYTES`` at a time: 18× faster than kfac-jax's ``patches_moments`` on
  XLA:CPU for the digits UNet, and equal to it to 1e-10 in float64. It reads the
  input channel count from the input's shape (kfac-jax 0.0.8's
  ``num_inputs_channels`` returned 1 for a 2-channel input).
- ``RepeatedDenseReduce`` / ``Conv2DReduce``: the "reduce" Kronecker approximation
  (positions pooled before the outer products), which kfac-jax does not have:
  A = E_n[ā āᵀ], ā = (1/R) Σ_r a_r, and G = E_n[g̃ g̃ᵀ], g̃ = Σ_r g_r.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import kfac_jax

class _ReduceUpdate:
  """The K-FAC-reduce update of a weight-shared layer's two factors.

  ``pool(x, dy)`` returns the per-example mean input [B, d_in] and summed output
  cotangent [B, d_out]; A = (1/B) Σ_b x̄_b x̄_bᵀ (with a trailing 1 for the bias) and
  G = (1/B) Σ_b ỹ_b ỹ_bᵀ are folded into the running sums.
  """

  def update_curvature_matrix_estimate(self, state, estimation_data, ema_old, ema_new,
                                       identity_weight, batch_size):
    del identity_weight
    state = state.copy()
    [x] = estimation_data.primals.inputs
    [dy] = estimation_data.tangents.outputs
    x, dy = self.pool(x, dy)
    if self.number_of_parameters == 2:  # the bias: a constant input 1
      x = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)
    state.factors[0].update(x.T @ x / batch_size, ema_old, ema_new)
    state.factors[1].update(dy.T @ dy / batch_size, ema_old, ema_new)
    return state


class RepeatedDenseReduce(_ReduceUpdate, kfac_jax.DenseTwoKroneckerFactored):
  """K-FAC-reduce block for a dense layer applied at R positions.

  From layer inputs x [B, R..., d_in] and output cotangents dy [B, R..., d_out]:
  A = (1/B) Σ_b x̄_b x̄_bᵀ with x̄_b the mean over positions (and a trailing 1 for
  the bias), G = (1/B) Σ_b ỹ_b ỹ_bᵀ with ỹ_b the sum over positions. Scale 1.
  """

  def pool(self, x, dy):
    return (jnp.mean(x, axis=tuple(range(1, x.ndim - 1))),
            jnp.sum(dy, axis=tuple(range(1, dy.ndim - 1))))


def hwio_patches(block: kfac_jax.Conv2DTwoKroneckerFactored, x) -> jax.Array:
  """The input patches of a conv layer, [B, L, kh·kw·c_in], in the HWIO kernel's order.

  L is the number of output locations. Each row pairs with the kernel flattened
  as (kh, kw, c_in), the order of kfac-jax's input factor.
  """
  p = block.layer_tag_extra_params
  dn = p["dimension_numbers"]
  if tuple(dn.rhs_spec) != (3, 2, 0, 1):
    raise NotImplementedError(
        f"{type(block).__name__} needs an HWIO kernel (rhs_spec (3, 2, 0, 1)), got {dn.rhs_spec}")
  if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
    raise NotImplementedError(f"{type(block).__name__} supports only ungrouped convolutions")
  patches = jax.lax.conv_general_dilated_patches(
      x, filter_shape=block.weights_spatial_shape, window_strides=p["window_strides"],
      padding=p["padding"], lhs_dilation=p.get("lhs_dilation"),
      rhs_dilation=p.get("rhs_dilation"), dimension_numbers=dn)
  # Patches come out in the output layout with features ordered (c_in, kh, kw).
  patches = jnp.moveaxis(patches, (dn.out_spec[0], dn.out_spec[1]), (0, 1))
  b, f = patches.shape[:2]
  patches = patches.reshape(b, f, -1)  # [B, c_in·kh·kw, L]
  kh, kw = block.weights_spatial_shape
  patches = patches.reshape(b, f // (kh * kw), kh, kw, -1)
  return patches.transpose(0, 4, 2, 3, 1).reshape(b, patches.shape[-1], f)


# Bytes of input patches Conv2DExpand extracts at once; larger batches are summed
# over chunks of examples.
PATCH_CHUNK_BYTES = 1 << 26


class Conv2DExpand(kfac_jax.Conv2DTwoKroneckerFactored):
  """kfac-jax's K-FAC-expand conv block, with the input factor from explicit patches.

  The same factors as ``kfac_jax.Conv2DTwoKroneckerFactored``:
  A = (1/(B L)) Σ_{b,l} p̃_bl p̃_blᵀ over the B × L input patches p_bl (with a
  trailing 1 for the bias), G = (1/(B L)) Σ_{b,l} dy_bl dy_blᵀ, scale L. kfac-jax
  computes A with convolutions over the input (``patches_moments``); this block
  extracts the patches and multiplies, which made the digits fit 18× faster on
  XLA:CPU (docs/benchmarks.md#curvature). The patches, [B, L, kh·kw·c_in], are
  extracted ``PATCH_CHUNK_BYTES`` at a time (a scan over chunks of examples).
  """

  def compute_inputs_stats(self, inputs, weighting_array=None):
    if weighting_array is not None:
      raise NotImplementedError("Conv2DExpand does not take a weighting_array")
    b = inputs.shape[0]
    # Not self.num_inputs_channels: in kfac-jax 0.0.8 it gave 1 for a 2-channel input.
    c_in = inputs.shape[self.layer_tag_extra_params["dimension_numbers"].lhs_spec[1]]
    width = c_in * self.weights_spatial_size
    chunk = max(1, PATCH_CHUNK_BYTES // (inputs.dtype.itemsize * self.num_locations * width))

    def moments(x):  # Σ p pᵀ and Σ p over the patches of x
      patches = hwio_patches(self, x).reshape(-1, width)
      return patches.T @ patches, jnp.sum(patches, axis=0)

    if b <= chunk:
      mm, v = moments(inputs)
    else:  # zero-padded examples add nothing to either sum
      pad = -b % chunk
      xs = jnp.pad(inputs, ((0, pad),) + ((0, 0),) * (inputs.ndim - 1))
      xs = xs.reshape((-1, chunk) + inputs.shape[1:])
      mm, v = jax.lax.scan(lambda acc, x: (jax.tree.map(jnp.add, acc, moments(x)), None),
                           moments(xs[0]), xs[1:])[0]
    count = b * self.num_locations
    mm, v = mm / count, v / count
    if self.number_of_parameters == 1:
      return mm
    one = jnp.ones((1, 1), mm.dtype)
    return jnp.block([[mm, v[:, None]], [v[None, :], one]])


class Conv2DReduce(_ReduceUpdate, kfac_jax.Conv2DTwoKroneckerFactored):
  """K-FAC-reduce block for a 2-D convolution (kernel layout HWIO, as in flax).

  A = (1/B) Σ_b p̄_b p̄_bᵀ with p̄_b the mean over output locations of the
  [kh·kw·c_in] input patches (and a trailing 1 for the bias), G = (1/B) Σ_b ỹ_b ỹ_bᵀ
  with ỹ_b the output cotangent summed over locations. Scale 1 (kfac-jax's
  expand block scales by the number of locations).
  """

  def fixed_scale(self):
    return 1.0

  def pool(self, x, dy):
    dn = self.layer_tag_extra_params["dimension_numbers"]
    dy = jnp.moveaxis(dy, (dn.out_spec[0], dn.out_spec[1]), (0, 1))
    return jnp.mean(hwio_patches(self, x), axis=1), jnp.sum(dy, axis=tuple(range(2, dy.ndim)))
