"""From an NNX module to the pure ``apply_fn(params, x_t, t)`` the rest of jattr uses.

jattr never holds a module: it holds a params pytree and a pure function of it. For
an NNX module that means

    graphdef, state = nnx.split(model, nnx.Param)     # structure | numbers
    params = pure nested dict of the arrays in state   # what optax/orbax/vmap see
    apply_fn(params, x_t, t) = nnx.merge(graphdef, state(params))(x_t, t)

A conditional UNet (``num_classes`` or ``cond_dim`` set) gets the four-argument form
of ``jattr.diffusion.conditioning``, ``apply_fn(params, x_t, t, cond)``, from every
builder here (``make_apply_fn``, ``kfac_apply_fn``, ``split_model``; the layered
form is ``apply_fn(params, x_t, t, cond, layer)``); ``null_condition`` is its
"no condition" (the null class, a zero context) for condition dropout and
classifier-free guidance.

The params dict uses string keys throughout: NNX numbers the entries of an
``nnx.List`` with ints, and a checkpoint restored by orbax comes back with those
keys as strings; storing strings from the start keeps a restored tree identical to
a fresh one. The module is rebuilt by *path* (``nnx.replace_by_pure_dict``), never
by leaf order, since sorted string keys ("10" < "2") and sorted ints disagree.
"""

from __future__ import annotations

import dataclasses

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from jattr.models.layers import route_layers
from jattr.models.unet import UNet, UNetConfig
from jattr.types import ApplyFn, Params


def _str_keys(tree: Any) -> Any:
  """A copy of a nested dict with every key turned into a string."""
  if isinstance(tree, dict):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def _path_str(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def _expected_shapes(template: nnx.State) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path (string keys) -> shape of every Param in ``template``."""
  return {tuple(map(str, path)): tuple(var.get_value().shape)
          for path, var in nnx.to_flat_state(template)}


def _check_params(params: Params, expected: dict[tuple[str, ...], tuple[int, ...]]) -> None:
  """Raises ValueError unless ``params`` has exactly the expected paths and shapes."""
  if not isinstance(params, dict):
    raise TypeError(f"params must be a nested dict of arrays, got {type(params).__name__}")
  flat = {tuple(map(str, path)): leaf for path, leaf in traverse_util.flatten_dict(params).items()}
  if flat.keys() != expected.keys():
    missing = sorted(map(_path_str, expected.keys() - flat.keys()))
    extra = sorted(map(_path_str, flat.keys() - expected.keys()))
    raise ValueError(f"params do not match the model: missing {missing[:5]}, "
                     f"unexpected {extra[:5]} (at most 5 of each shown)")
  for path, shape in expected.items():
    if tuple(np.shape(flat[path])) != shape:
      raise ValueError(f"params[{_path_str(path)!r}] has shape {np.shape(flat[path])}, "
                       f"the model expects {shape}")


def _fill(template: nnx.State, params: Params) -> nnx.State:
  """A new State with ``template``'s structure holding the arrays of ``params``."""
  # Copy first: replace_by_pure_dict mutates in place, and the template is shared
  # by every trace of the apply function.
  state = jax.tree.map(lambda v: v, template)
  nnx.replace_by_pure_dict(state, params)
  return state


def _make_apply_fn(graphdef: nnx.GraphDef, template: nnx.State,
                   conditional: bool = False) -> ApplyFn:
  """The pure apply function of ``graphdef``, with ``template`` giving paths and shapes;
  ``apply_fn(params, x_t, t, cond)`` when ``conditional``."""
  expected = _expected_shapes(template)

  def apply_fn(params: Params, x_t: jax.Array, t: jax.Array) -> jax.Array:
    """Runs the model.

    Args:
      params: nested dict of arrays, as returned by ``split_model`` or an init function.
      x_t: noisy images [B, H, W, C].
      t: integer timesteps [B].

    Returns:
      The network output [B, H, W, C].
    """
    _check_params(params, expected)
    return nnx.merge(graphdef, _fill(template, params))(x_t, t)

  def cond_apply_fn(params: Params, x_t: jax.Array, t: jax.Array, cond) -> jax.Array:
    """Runs the conditional model.

    Args:
      params: nested dict of arrays, as returned by ``split_model`` or an init function.
      x_t: noisy images [B, H, W, C].
      t: integer timesteps [B].
      cond: the condition, leading axis B (``UNet.__call__``; ``null_condition``).

    Returns:
      The network output [B, H, W, C].
    """
    _check_params(params, expected)
    return nnx.merge(graphdef, _fill(template, params))(x_t, t, cond)

  return cond_apply_fn if conditional else apply_fn


def _is_conditional(model: nnx.Module) -> bool:
  config = getattr(model, "config", None)
  return isinstance(config, UNetConfig) and config.conditional


def _abstract(state: nnx.State) -> nnx.State:
  """Shapes and dtypes only, so the apply closure does not keep arrays alive."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def split_model(model: nnx.Module) -> tuple[ApplyFn, Params]:
  """Splits an NNX module into a pure apply function and a plain params dict.

  Args:
    model: any NNX module whose only state is ``nnx.Param`` and whose
      ``__call__(x_t, t)`` returns the prediction (``__call__(x_t, t, cond)`` for a
      conditional UNet).

  Returns:
    ``(apply_fn, params)``: ``apply_fn(params, x_t, t)`` is pure (usable under
    ``jit``, ``grad`` and ``vmap``, including over a stacked leading axis of params),
    and ``params`` is a nested dict of arrays with string keys. For a conditional
    UNet it is ``apply_fn(params, x_t, t, cond)``.

  Raises:
    ValueError: if the model holds state other than ``nnx.Param`` (BatchNorm
      statistics, RNG counters of dropout…), which a pure function of params would
      silently drop.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  others = [_path_str(path) for path, _ in nnx.to_flat_state(rest)]
  if others:
    raise ValueError(f"model must hold only nnx.Param state, but it also holds {others[:5]} "
                     f"({len(others)} non-Param variables); remove BatchNorm/Dropout/RNG state")
  return (_make_apply_fn(graphdef, _abstract(params), _is_conditional(model)),
          _str_keys(nnx.to_pure_dict(params)))


def _abstract_unet(config: UNetConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """The UNet's graphdef and a State of ``ShapeDtypeStruct``s, without allocating."""
  return nnx.split(nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0))), nnx.Param)


# Standard deviation of a unit normal truncated to [-2, 2].
_TRUNC_STD = 0.87962566103423978


def _draw(template: nnx.State, key: jax.Array) -> Params:
  """Initial params for ``template`` with ONE random draw for all kernels.

  The distributions are flax's defaults for Conv, Linear, GroupNorm and Embed: kernels
  LeCun normal (normal truncated to ±2σ, variance 1/fan_in, fan_in = the product of
  all but the last kernel axis), biases 0, scales 1, embedding tables [rows, features]
  truncated normal of variance 1/features. Drawing each kernel with its
  own key, as the layers do, costs XLA about 0.2 s of compilation per draw on CPU
  (threefry is compiled once per call site), i.e. tens of seconds for a UNet and
  more again under ``vmap``; slicing one flat draw compiles in well under a second.
  """
  leaves = {tuple(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(template)}
  # Kernels and embedding tables share the draw; an unconditional UNet has no table, so
  # its draw is what it was before embeddings existed.
  kernels = sorted(path for path in leaves if path[-1] in ("kernel", "embedding"))
  sizes = [int(np.prod(leaves[path].shape)) for path in kernels]
  dtype = leaves[kernels[0]].dtype
  flat = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), dtype)
  start = dict(zip(kernels, np.cumsum([0] + sizes)))
  params = {}
  for path, leaf in leaves.items():
    if path[-1] == "kernel":
      std = 1.0 / (np.sqrt(np.prod(leaf.shape[:-1])) * _TRUNC_STD)
      piece = flat[start[path]:start[path] + leaf.size]
      params[path] = (std * piece).reshape(leaf.shape).astype(leaf.dtype)
    elif path[-1] == "embedding":
      std = 1.0 / (np.sqrt(leaf.shape[-1]) * _TRUNC_STD)
      piece = flat[start[path]:start[path] + leaf.size]
      params[path] = (std * piece).reshape(leaf.shape).astype(leaf.dtype)
    elif path[-1] == "bias":
      params[path] = jnp.zeros(leaf.shape, leaf.dtype)
    elif path[-1] == "scale":
      params[path] = jnp.ones(leaf.shape, leaf.dtype)
    else:
      raise NotImplementedError(f"no initialiser for parameter {_path_str(path)!r}")
  return traverse_util.unflatten_dict(params)


def make_init_fn(config: UNetConfig):
  """The pure initialiser ``init(key) -> params`` of a UNet.

  Args:
    config: the architecture.

  Returns:
    ``init(key)``: a pure function of ``key`` returning the params dict (string keys,
    float32 leaves) of ``make_model(config, key)``. It can be jitted, and vmapped over
    a batch of keys to initialise many models at once (leaves get a leading axis).

  Example:
    >>> init = make_init_fn(digits_config())
    >>> stacked = jax.vmap(init)(jax.random.split(jax.random.key(0), 8))
  """
  _, template = _abstract_unet(config)
  return functools.partial(_draw, template)


def make_model(config: UNetConfig, key: jax.Array) -> UNet:
  """A UNet initialised from ``key``, holding the params of ``make_init_fn(config)(key)``.

  Same distributions as ``UNet(config, rngs=nnx.Rngs(key))`` but not the same
  values: all kernels come from one draw (see ``make_init_fn``).
  """
  return merge_model(config, make_init_fn(config)(key))


def make_apply_fn(config: UNetConfig) -> ApplyFn:
  """The UNet's ``apply_fn(params, x_t, t)``, built without allocating parameters;
  ``apply_fn(params, x_t, t, cond)`` for a conditional config (``UNet.__call__``)."""
  return _make_apply_fn(*_abstract_unet(config), conditional=config.conditional)


def null_condition(config: UNetConfig, batch: int | None, context_length: int = 1):
  """The "no condition" input of a conditional UNet, for ``batch`` examples.

  The null class label ``num_classes`` (int32) for ``num_classes``; a context of
  zeros [batch, context_length, cond_dim] (float32) for ``cond_dim``; the dict
  ``{"label": ..., "context": ...}`` of both for both. A zero context's keys are all
  equal, so cross-attention over it gives the same output for every
  ``context_length``: the default 1 suffices.

  Args:
    config: a conditional config.
    batch: the leading axis B; ``None`` gives ONE example's null condition, without a
      batch axis (labels a scalar, the context [context_length, cond_dim]): the
      ``null_cond`` that ``jattr.train.train`` replaces dropped conditions with.
    context_length: L of the zero context.

  Raises:
    ValueError: the config is unconditional.

  Example:
    >>> config = digits_config(num_classes=10)
    >>> null_condition(config, 3)
    Array([10, 10, 10], dtype=int32)
  """
  if not config.conditional:
    raise ValueError("null_condition needs a conditional config (num_classes or cond_dim "
                     "set); an unconditional model takes no condition")
  lead = () if batch is None else (int(batch),)
  label = (None if config.num_classes is None
           else jnp.full(lead, config.num_classes, jnp.int32))
  context = (None if config.cond_dim is None
             else jnp.zeros(lead + (int(context_length), config.cond_dim), jnp.float32))
  if label is not None and context is not None:
    return {"label": label, "context": context}
  return label if label is not None else context


def kfac_apply_fn(config: UNetConfig) -> ApplyFn:
  """The UNet's ``apply_fn`` with native convolutions (``conv_impl="xla"``).

  Needed only for ``fit_kfac(..., backend="kfac_jax")``: kfac-jax's graph matcher
  recognises only ``lax.conv_general_dilated`` convolutions, not the im2col ones the
  CPU build of the UNet uses by default. The native ``fit_kfac``
  (``jattr.layer_registry``) finds the same layers and factors with either
  implementation. ``jattr fit-curvature`` and the digits benchmark still fit K-FAC
  on this function, so that their K-FAC fits stay comparable with earlier ones
  (and on CPU the native fit is faster on it than on the im2col UNet). The
  parameters are the same, so a K-FAC fitted with it applies to the model built with
  ``make_apply_fn(config)``.
  """
  return make_apply_fn(dataclasses.replace(config, conv_impl="xla"))


def make_layered_apply_fn(config: UNetConfig):
  """The UNet's ``apply_fn(params, x_t, t, layer)``, its kernels routed through ``layer``;
  ``apply_fn(params, x_t, t, cond, layer)`` for a conditional config.

  Every Conv and Linear kernel of the UNet is applied by
  ``layer(name, x, kernel, spec)`` (``jattr.models.layers.route_layers``), ``name``
  being the layer's path in ``params`` ("/"-joined, e.g. ``"mid1/conv2"``; the kernel
  is ``params[...]["kernel"]`` at that path). Biases, GroupNorm parameters and
  the class-embedding table stay outside ``layer``. This is the form the structured
  projection needs; with ``jattr.features.plain_layer`` it computes the same function as
  ``make_apply_fn(config)`` (bit for bit with ``conv_impl="xla"``).

  Example:
    >>> layered = make_layered_apply_fn(config)
    >>> def fn(params, x0, layer):   # a jattr.features.StructuredFn
    ...   apply_fn = functools.partial(layered, layer=layer)
    ...   return measurement_fn("square_norm", apply_fn, schedule, draws)(params, x0)
  """
  graphdef, template = _abstract_unet(config)
  expected = _expected_shapes(template)

  def apply_fn(params: Params, x_t: jax.Array, t: jax.Array, layer) -> jax.Array:
    _check_params(params, expected)
    return route_layers(nnx.merge(graphdef, _fill(template, params)), layer)(x_t, t)

  def cond_apply_fn(params: Params, x_t: jax.Array, t: jax.Array, cond, layer) -> jax.Array:
    _check_params(params, expected)
    return route_layers(nnx.merge(graphdef, _fill(template, params)), layer)(x_t, t, cond)

  return cond_apply_fn if config.conditional else apply_fn


def merge_model(config: UNetConfig, params: Params) -> UNet:
  """Rebuilds a UNet module holding ``params`` (the inverse of ``split_model``)."""
  graphdef, template = _abstract_unet(config)
  _check_params(params, _expected_shapes(template))
  return nnx.merge(graphdef, _fill(template, params))


def num_params(params: Params) -> int:
  """Total number of scalars in a params pytree (arrays or ``ShapeDtypeStruct``s)."""
  return int(sum(np.prod(np.shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(params)))
