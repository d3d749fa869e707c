"""Layer specs shared by structured projection and the model adapters.

A pure ``apply_fn`` hides its layers. Models that expose them are written against an
injected layer function (pure; no hooks, no global state)::

    layer(name, x, w, spec=Dense()) -> y

called once for every weight, with a unique ``name``, the input ``x`` and the weight
``w`` as the model uses it. ``spec`` says what the layer computes:

- ``Dense()``: y = x @ w with x [..., d_in] and w [d_in, d_out];
- ``Conv(strides, padding, dilation)``: y = conv(x, w) with x [B, H, W, c_in] (NHWC)
  and w [kh, kw, c_in, c_out] (HWIO).

``plain_layer`` is the ordinary implementation (what a model computes outside
attribution); ``jattr.features.structured`` replaces it with one that records the
layer's input and output cotangent, and ``jattr.models.route_layers`` routes a flax
NNX module's ``Conv`` and ``Linear`` kernels through it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import jax


@dataclasses.dataclass(frozen=True)
class Dense:
  """y = x @ w with x [..., d_in] and w [d_in, d_out]."""


@dataclasses.dataclass(frozen=True)
class Conv:
  """y = conv(x, w), x [B, H, W, c_in] (NHWC), w [kh, kw, c_in, c_out] (HWIO).

  Attributes:
    strides: window strides (sh, sw).
    padding: ``"SAME"``, ``"VALID"`` or ((lo, hi), (lo, hi)).
    dilation: kernel (rhs) dilation (dh, dw).
  """

  strides: tuple[int, int] = (1, 1)
  padding: Union[str, tuple[tuple[int, int], tuple[int, int]]] = "SAME"
  dilation: tuple[int, int] = (1, 1)


LayerSpec = Union[Dense, Conv]
LayerFn = Callable[..., jax.Array]
"""``layer(name, x, w, spec=Dense()) -> y``."""


def apply_layer(spec: LayerSpec, x: jax.Array, w: jax.Array) -> jax.Array:
  """The plain layer operation described by ``spec`` (no bias)."""
  if isinstance(spec, Dense):
    if w.ndim != 2 or x.shape[-1:] != w.shape[:1]:
      raise ValueError(f"Dense needs x [..., d_in] and w [d_in, d_out], got x {x.shape} "
                       f"and w {w.shape}")
    return x @ w
  if isinstance(spec, Conv):
    if w.ndim != 4 or x.ndim != 4 or x.shape[-1] != w.shape[2]:
      raise ValueError(f"Conv needs x [B, H, W, c_in] and w [kh, kw, c_in, c_out], got x "
                       f"{x.shape} and w {w.shape}")
    return jax.lax.conv_general_dilated(
        x, w, window_strides=spec.strides, padding=spec.padding,
        rhs_dilation=spec.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  raise TypeError(f"spec must be Dense() or Conv(...), got {spec!r}")


def plain_layer(name: str, x: jax.Array, w: jax.Array, spec: LayerSpec = Dense()
                ) -> jax.Array:
  """The ordinary ``layer`` for models written against the contract; ignores ``name``."""
  del name
  return apply_layer(spec, x, w)
