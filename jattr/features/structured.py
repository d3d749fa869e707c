"""Structured (Kronecker, LoGra-style) projection of dense and conv gradients.

For a layer y_s = Wᵀ a_s applied at positions s (draws, pixels, tokens), with
W [d_in, d_out], input a_s ∈ R^{d_in} and output cotangent δ_s = ∂f/∂y_s ∈ R^{d_out},
the per-example gradient is ∂f/∂W = Σ_s a_s δ_sᵀ. Projecting it with the Kronecker
matrix P = P_in ⊗ P_out (P_in [d_in, k_in], P_out [d_out, k_out]) never needs it:

    φ = (P_in ⊗ P_out)ᵀ vec(∂f/∂W) = vec(P_inᵀ (∂f/∂W) P_out) = vec(Σ_s (P_inᵀ a_s)(P_outᵀ δ_s)ᵀ),

(vec row-major, as ``ravel_pytree``). A conv layer with HWIO kernel W [kh, kw, c_in,
c_out] is the same with a_s the (kh, kw, c_in) input patch at output position s,
and P_inᵀ a_s for all s is itself a convolution of the input with P_in reshaped to
[kh, kw, c_in, k_in], so patches are never materialised either. Entries of P_in and
P_out are N(0,1) or ±1 scaled by 1/√k_in and 1/√k_out, independent, so
E[P Pᵀ] = E[P_in P_inᵀ] ⊗ E[P_out P_outᵀ] = I and inner products are preserved in
expectation, as for the dense projection (``projection.py``).

Contract. A pure ``apply_fn`` hides its layers, so the model is written against an
injected layer function (pure; no hooks, no global state):

    fn(params, example, layer) -> scalar,    layer(name, x, w, spec=Dense()) -> y,

where the model calls ``layer`` for every weight to be featurised, with a unique
``name`` and the weight ``w`` as it uses it; ``plain_layer`` is the ordinary
implementation to use outside attribution. Biases and anything else the model does
outside ``layer`` are not featurised.

Covered: ``Dense`` (y = x @ w, any leading axes on x) and ``Conv`` (NHWC input, HWIO
kernel, strides, padding, kernel dilation). Not covered: a name called more than
once (weight sharing; raises), grouped/depthwise and transposed convolutions,
biases, normalisation scales, embeddings. φ is the projection of ∂f/∂w for the ``w``
passed to ``layer``; if the model transforms a parameter before passing it, that is
the gradient of the transformed weight.

Layer features are concatenated in sorted ``name`` order, each as the row-major
ravel of the [k_in, k_out] matrix (``structured_layout`` gives the slices).

``wrt``. Here a selector picks *layers*, by the ``name`` the model gives ``layer``
(a regex searched in the name, or a predicate on it; a mask pytree is refused, the
layers are not a pytree): ``wrt="^up/"`` featurises the layers whose names start
with ``up/``. The weights are what the model passes to ``layer``, not leaves of
``params`` (a LoRA-merged kernel is one weight), so the leaf selectors of
``jattr.wrt`` do not apply; name the layers the way their parameters are named and
the same regex serves both. Unselected layers run as ``plain_layer`` (no
perturbation, no projection): φ = [φ_l]_{l selected}, in sorted name order.

Example:
  >>> def model(params, x_t, t, layer=plain_layer):
  ...   h = jax.nn.silu(layer("c1", x_t, params["c1"], Conv()))
  ...   return layer("c2", h, params["c2"], Conv())
  >>> def fn(params, x0, layer):
  ...   apply_fn = functools.partial(model, layer=layer)
  ...   return measurement_fn("square_norm", apply_fn, schedule, draws)(params, x0)
  >>> phi = structured_featurize(fn, params, train_images, StructuredConfig(16, 16))
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Literal, Union

import jax
import jax.numpy as jnp

from jattr.features.projection import DENSE_KINDS, check_finite_params, random_matrix
from jattr.grads.per_example import apply_chunks
# plain_layer is re-exported: the docstring's contract names it as the ordinary layer.
from jattr.layers import Conv, Dense, LayerFn, LayerSpec, apply_layer, plain_layer  # noqa: F401
from jattr.progress import Progress
from jattr.types import Params
from jattr.wrt import Selector, select_names


StructuredFn = Callable[[Params, Any, LayerFn], jax.Array]
"""``fn(params, example, layer) -> scalar``, for ONE example."""


@dataclasses.dataclass(frozen=True)
class StructuredConfig:
  """A seeded Kronecker projection P_in ⊗ P_out per layer.

  Attributes:
    dim_in: k_in, the projected input dimension of every layer.
    dim_out: k_out, the projected output dimension; a layer gives k_in·k_out features.
    kind: ``"gaussian"`` or ``"rademacher"``.
    seed: layer ``name``'s matrices come from ``fold_in(key(seed), crc32(name))``
      (then ``fold_in(·, 0)`` for P_in, ``fold_in(·, 1)`` for P_out), so they do not
      depend on the other layers or on their order.
  """

  dim_in: int
  dim_out: int
  kind: Literal["gaussian", "rademacher"] = "rademacher"
  seed: int = 0

  def __post_init__(self):
    if int(self.dim_in) < 1 or int(self.dim_out) < 1:
      raise ValueError(f"StructuredConfig dims must be >= 1, got dim_in={self.dim_in}, "
                       f"dim_out={self.dim_out}")
    if self.kind not in DENSE_KINDS:
      raise ValueError(f"StructuredConfig.kind must be one of {DENSE_KINDS}, got {self.kind!r}")


def layer_projections(config: StructuredConfig, name: str, d_in: int, d_out: int,
                      dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """(P_in [d_in, k_in], P_out [d_out, k_out]) of layer ``name``.

  For a conv layer d_in = kh·kw·c_in, rows in the (kh, kw, c_in) order of the HWIO
  kernel's row-major ravel.
  """
  key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  p_in = random_matrix(jax.random.fold_in(key, 0), (d_in, config.dim_in), config.kind, dtype)
  p_out = random_matrix(jax.random.fold_in(key, 1), (d_out, config.dim_out), config.kind, dtype)
  return p_in, p_out


def _selected_layers(records: dict, wrt: Selector) -> list[str]:
  """The sorted names of the recorded layers ``wrt`` keeps (raises if none)."""
  names = sorted(records)
  return [n for n, c in zip(names, select_names(names, wrt, what="layers")) if c]


def _record_layers(fn: StructuredFn, params, example) -> dict[str, tuple]:
  """name -> (spec, w shape, y shape) for each ``layer`` call, by abstract evaluation."""
  records = {}

  def recording_layer(name, x, w, spec=Dense()):
    if not isinstance(name, str):
      raise TypeError(f"layer name must be a str, got {name!r}")
    if name in records:
      raise ValueError(f"layer {name!r} was called twice; weight sharing is not covered by "
                       "the structured projection (give each call its own name)")
    y = apply_layer(spec, x, w)
    records[name] = (spec, tuple(w.shape), tuple(y.shape), y.dtype)
    return y

  jax.eval_shape(lambda p, e: fn(p, e, recording_layer), params, example)
  if not records:
    raise ValueError("fn never called its layer argument; nothing to featurise")
  return records


def structured_layout(fn: StructuredFn, params: Params, example, config: StructuredConfig,
                      *, wrt: Selector = None) -> dict[str, slice]:
  """Where each layer's k_in·k_out features sit in the output of ``structured_features_fn``.

  Args:
    fn, params: as in ``structured_featurize``.
    example: ONE example (no leading N).
    config: the structured projection.
    wrt: the layers to featurise, by name (module docstring; ``None``: all).

  Returns:
    name -> slice into the feature vector, in sorted name order.
  """
  names = _selected_layers(_record_layers(fn, params, example), wrt)
  size = config.dim_in * config.dim_out
  return {n: slice(i * size, (i + 1) * size) for i, n in enumerate(names)}


def structured_features_fn(fn: StructuredFn, config: StructuredConfig, *,
                           wrt: Selector = None) -> Callable[[Params, Any], jax.Array]:
  """The kernel φ(θ; z) for ONE example: concatenated Kronecker-projected layer gradients.

      φ_l = vec(Σ_s (P_inᵀ a_s)(P_outᵀ δ_s)ᵀ),   δ_s = ∂fn/∂y_s,

  δ comes from one ``jax.vjp`` of fn with respect to zero perturbations added to
  every layer's output (the cotangent of the perturbation is ∂fn/∂y), and a is the
  recorded layer input: one forward and one backward pass, no parameter gradient.

  Args:
    fn: ``fn(params, example, layer) -> scalar`` (module docstring's contract).
    config: the structured projection.
    wrt: the layers to featurise, by name (module docstring; ``None``: all).

  Returns:
    ``features(params, example) -> [L · k_in · k_out]`` (L selected layers).
  """

  def features(params, example):
    records = _record_layers(fn, params, example)
    names = _selected_layers(records, wrt)
    zeros = {n: jnp.zeros(records[n][2], records[n][3]) for n in names}

    def perturbed(z):
      inputs = {}

      def layer(name, x, w, spec=Dense()):
        if name not in z:  # a layer wrt leaves out: the plain layer
          return apply_layer(spec, x, w)
        inputs[name] = x
        return apply_layer(spec, x, w) + z[name]

      return fn(params, example, layer), inputs

    out, vjp_fn, inputs = jax.vjp(perturbed, zeros, has_aux=True)
    if jnp.ndim(out) != 0:
      raise ValueError(f"fn must return a scalar, got shape {jnp.shape(out)}")
    (deltas,) = vjp_fn(jnp.ones_like(out))
    feats = []
    for name in names:
      spec, w_shape, _, _ = records[name]
      a, delta = inputs[name], deltas[name]
      d_in, d_out = math.prod(w_shape[:-1]), w_shape[-1]
      p_in, p_out = layer_projections(config, name, d_in, d_out, delta.dtype)
      if isinstance(spec, Conv):
        # P_inᵀ a_s over all output positions s is the conv with kernel P_in.
        a_proj = apply_layer(spec, a, p_in.reshape(w_shape[:-1] + (config.dim_in,)))
      else:
        a_proj = a @ p_in
      a_proj = a_proj.reshape(-1, config.dim_in)
      d_proj = delta.reshape(-1, d_out) @ p_out
      feats.append((a_proj.T @ d_proj).reshape(-1))
    return jnp.concatenate(feats)

  return features


@dataclasses.dataclass(frozen=True)
class _StructuredRows:
  """The chunk kernel of ``structured_featurize`` (hashable)."""

  fn: StructuredFn
  config: StructuredConfig
  wrt: Selector = None

  def __call__(self, params, chunk):
    return jax.vmap(structured_features_fn(self.fn, self.config, wrt=self.wrt),
                    in_axes=(None, 0))(params, chunk)


def structured_featurize(fn: StructuredFn, params: Params, examples, config: StructuredConfig,
                         *, chunk_size: int | None = None,
                         progress: Progress | None = None, wrt: Selector = None) -> jax.Array:
  """Structured features for every example, ``vmap`` over chunks of ``chunk_size``.

  Chunks run as in ``jattr.features.featurize``: a host loop over one compiled chunk
  program when called eagerly, ``lax.map`` inside a caller's ``jit``.

  Args:
    fn: ``fn(params, example, layer) -> scalar`` (module docstring's contract); hashable.
    params: θ.
    examples: pytree with leading axis N.
    config: the structured projection.
    chunk_size: examples processed at once; ``None`` = all N.
    progress: called after each chunk with examples done (``jattr.progress``).
    wrt: the layers to featurise, by the names the model gives ``layer`` (a regex
      or a predicate; module docstring). ``None``: every layer.

  Returns:
    Φ, shape [N, L · k_in · k_out] (L = number of selected layers; see
    ``structured_layout``).

  Raises:
    ValueError: ``params`` hold NaN or inf (eager calls), or ``wrt`` keeps no layer.
    TypeError: ``wrt`` is a mask pytree.
  """
  check_finite_params(params)
  if wrt is not None and not isinstance(wrt, str) and not callable(wrt):
    raise TypeError("structured_featurize selects layers by name: wrt must be None, a regex "
                    f"str or a predicate on the layer name, got {type(wrt).__name__}")
  return apply_chunks(_StructuredRows(fn, config, wrt), params, examples, chunk_size=chunk_size,
                      progress=progress, desc="structured featurize")
