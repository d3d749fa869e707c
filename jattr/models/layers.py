"""Routing an NNX module's Conv and Linear kernels through an injected ``layer`` function.

The structured projection (``jattr.features.structured``) needs the model written
against ``layer(name, x, w, spec) -> y``: it must see each featurised layer's input
and output. A flax NNX model does not call such a function, but every ``nnx.Conv``
calls its ``conv_general_dilated`` attribute and every ``nnx.Linear`` its
``dot_general`` attribute with exactly (input, kernel, …). ``route_layers`` replaces
those two attributes on a module built for one call (fresh from ``nnx.merge``) with
adapters that call

    layer(name, x, kernel, Conv(strides, padding, dilation))   for nnx.Conv,
    layer(name, x, kernel, Dense())                            for nnx.Linear,

where ``name`` is the layer's path in the module tree, "/"-joined, so the kernel is
``params[name.split("/")]["kernel"]`` in the plain-dict params of
``jattr.models.bridge`` (e.g. ``"down/0/blocks/0/conv1"``). Biases are still added by
the layer outside ``layer`` and GroupNorm never reaches it: exactly the Conv and
Linear kernels are covered.

The module class itself is untouched (``UNet.__call__`` has no ``layer`` argument);
``jattr.models.make_layered_apply_fn`` builds the pure
``apply_fn(params, x_t, t, layer)`` from it, and the default ``make_apply_fn`` is the
same model with nothing routed. With ``plain_layer`` the routed model computes the
same function; it runs convolutions with ``lax.conv_general_dilated``, so its
outputs equal a ``conv_impl="xla"`` model's bit for bit and an ``"im2col"`` one's to
float rounding.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from jattr.layers import Conv, Dense, LayerFn
from jattr.models.conv import is_nhwc


def _conv_adapter(layer: LayerFn, name: str) -> Callable[..., jax.Array]:
  """A ``conv_general_dilated`` replacement that calls ``layer(name, x, w, Conv(...))``."""

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    del precision  # the layer function decides how to compute
    extra = {k: v for k, v in kwargs.items() if v is not None}
    if (lhs.ndim != 4 or not is_nhwc(dimension_numbers) or feature_group_count != 1
        or any(d != 1 for d in (lhs_dilation or (1, 1))) or extra):
      raise NotImplementedError(
          f"layer {name!r}: only 2-D NHWC/HWIO convolutions without input dilation or "
          f"feature groups can be routed, got lhs.ndim={lhs.ndim}, "
          f"feature_group_count={feature_group_count}, lhs_dilation={lhs_dilation}, "
          f"extra arguments {sorted(extra)}")
    if not isinstance(padding, str):
      padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    spec = Conv(strides=tuple(int(s) for s in window_strides), padding=padding,
                dilation=tuple(int(d) for d in (rhs_dilation or (1, 1))))
    return layer(name, lhs, rhs, spec)

  return conv


def _dense_adapter(layer: LayerFn, name: str) -> Callable[..., jax.Array]:
  """A ``dot_general`` replacement for ``nnx.Linear`` that calls ``layer(name, x, w)``."""

  def dense(lhs, rhs, dimension_numbers, precision=None, **kwargs):
    del precision
    extra = {k: v for k, v in kwargs.items() if v is not None}
    expected = (((lhs.ndim - 1,), (0,)), ((), ()))
    if rhs.ndim != 2 or _as_tuples(dimension_numbers) != expected or extra:
      raise NotImplementedError(
          f"layer {name!r}: only x [..., d_in] @ w [d_in, d_out] can be routed, got "
          f"dimension_numbers={dimension_numbers}, w {rhs.shape}, extra arguments "
          f"{sorted(extra)}")
    return layer(name, lhs, rhs, Dense())

  return dense


def _as_tuples(tree):
  if isinstance(tree, (list, tuple)):
    return tuple(_as_tuples(t) for t in tree)
  return tree


def route_layers(module: nnx.Module, layer: LayerFn) -> nnx.Module:
  """Makes every ``nnx.Conv`` and ``nnx.Linear`` of ``module`` compute through ``layer``.

  Modifies ``module`` in place: call it only on a module built for this call (e.g.
  by ``nnx.merge`` inside the apply function), never on one that is shared.

  Args:
    module: an NNX module tree.
    layer: ``layer(name, x, w, spec) -> y`` (``jattr.features.structured`` contract).

  Returns:
    ``module``, whose Conv/Linear layers now call ``layer`` with their "/"-joined
    path as ``name``.

  Raises:
    ValueError: if the module contains no Conv or Linear layer.
  """
  found = False
  for path, node in nnx.iter_graph(module):
    name = "/".join(str(k) for k in path)
    if isinstance(node, nnx.Conv):
      node.conv_general_dilated = _conv_adapter(layer, name)
      found = True
    elif isinstance(node, nnx.Linear):
      node.dot_general = _dense_adapter(layer, name)
      found = True
  if not found:
    raise ValueError(f"{type(module).__name__} has no nnx.Conv or nnx.Linear layer to route")
  return module
