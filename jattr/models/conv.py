"""Convolution as patches × matrix ("im2col"), a drop-in for ``lax.conv_general_dilated``.

Why this exists: on XLA:CPU (jax 0.9.1) the *gradient* of a native convolution runs
~25× slower inside a loop body (``lax.scan``, ``lax.map``, ``fori_loop``) than the
same computation outside one (measured: 4 steps of a 3×3, 32-channel conv on 64×8×8
inputs, 839 ms in a scan vs 30 ms unrolled; see docs/benchmarks.md). Training
segments and ``train_many``'s member map are loops, so on CPU jattr's UNet runs its
convolutions as one matrix product over shifted copies of the input instead; this
form is as fast in a loop as outside it, and under ``vmap`` over a member axis it
becomes a batched matmul rather than a grouped convolution. On GPU/TPU the native
convolution is used.

For an input x [B, H, W, Cin] and kernel w [kh, kw, Cin, Cout] with stride s,

    y[b, i, j, :] = Σ_{p<kh, q<kw} x̃[b, s·i + p, s·j + q, :] · w[p, q]      (x̃ = padded x)
                  = cols[b, i, j, :] · reshape(w, [kh·kw·Cin, Cout]),

where ``cols`` concatenates the kh·kw strided shifts of x̃ along channels.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

_NHWC = ("NHWC", "HWIO", "NHWC")


def is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, tuple) and all(isinstance(d, str) for d in dimension_numbers):
    return tuple(dimension_numbers) == _NHWC
  expected = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
  return tuple(dimension_numbers) == tuple(expected)


def im2col_conv(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                precision=None, **unused_kwargs):
  """``lax.conv_general_dilated`` for 2-D NHWC/HWIO convolutions, via patches × matrix.

  Supports any strides and padding (``"SAME"``, ``"VALID"`` or explicit pairs);
  raises ``NotImplementedError`` for dilation, grouped convolutions or other layouts
  rather than computing something else.

  Args:
    lhs: input [B, H, W, Cin].
    rhs: kernel [kh, kw, Cin, Cout].
    window_strides: (sh, sw).
    padding: ``"SAME"``, ``"VALID"`` or ((lo, hi), (lo, hi)).

  Returns:
    [B, H', W', Cout], equal (up to float rounding) to the native convolution.
  """
  if lhs.ndim != 4 or not is_nhwc(dimension_numbers):
    raise NotImplementedError(f"im2col_conv supports 2-D NHWC/HWIO only, got lhs.ndim={lhs.ndim}, "
                              f"dimension_numbers={dimension_numbers}")
  if any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))):
    raise NotImplementedError("im2col_conv does not support dilation")
  if feature_group_count != 1:
    raise NotImplementedError("im2col_conv does not support grouped convolutions")
  kh, kw, cin, cout = rhs.shape
  sh, sw = window_strides
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
  else:
    pads = [tuple(p) for p in padding]
  x = jnp.pad(lhs, ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (x.shape[1] - kh) // sh + 1
  wo = (x.shape[2] - kw) // sw + 1
  if kh == kw == 1 and sh == sw == 1:
    cols = x
  else:
    cols = jnp.concatenate(
        [x[:, p:p + sh * (ho - 1) + 1:sh, q:q + sw * (wo - 1) + 1:sw, :]
         for p in range(kh) for q in range(kw)], axis=-1)
  return jnp.dot(cols, rhs.reshape(kh * kw * cin, cout), precision=precision)
