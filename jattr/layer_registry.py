"""The layer registry: every dense and conv weight of any JAX model, found in its jaxpr.

K-FAC, EK-FAC and structured projections need, for each weight matrix W, the layer's
input a (what W multiplies) and the cotangent δ = ∂f/∂y of its output y. A pure
``apply_fn`` hides both. Whatever framework built it (flax NNX or linen, equinox,
haiku, plain ``jnp``), a dense layer reaches XLA as one ``dot_general`` and a
convolution as one ``conv_general_dilated`` with a parameter leaf as an operand. The
registry traces ``fn(params, *args)`` once with ``jax.make_jaxpr`` and finds them:

- a **site** is a ``dot_general`` or ``conv_general_dilated`` one of whose operands is
  a *view* of a parameter leaf (the leaf itself, or the leaf through
  ``transpose`` / ``reshape`` / ``convert_element_type`` / ``copy``), the other an
  activation. Its weight leaf gets a Kronecker block named by the leaf's path;
- a **bias** is a 1-D leaf of size d_out added (broadcast along the output feature
  axis, checked numerically) to a site's output: it joins the site's block as a
  constant input 1;
- a **LoRA adapter** is a weight of the form ``W + c · reshape(A @ B)`` with A, B
  leaves (``jattr.models.lora``). The layer computes y = a (W + c A B), so
  ∂f/∂A = Σ a (c B δ)ᵀ and ∂f/∂B = Σ (c Aᵀ a) δᵀ: A and B get Kronecker blocks of their
  own, with inputs a, c Aᵀ a and output cotangents c B δ, δ;
- every other leaf (normalisation scales, embeddings, a weight used inside a
  ``scan``, a grouped convolution, a weight multiplied elementwise) is *unmatched*,
  with the reason. Curvatures give it a diagonal block; K-FAC warns for each
  unmatched leaf with two or more axes, naming its path.

Sub-jaxprs of ``jit``, ``custom_jvp`` / ``custom_vjp`` functions and ``checkpoint``
are searched and, where they contain a site, inlined when the model is evaluated;
``scan``, ``while`` and ``cond`` bodies are not searched.

``instrument(registry)`` gives the model evaluated with a perturbation z added to
every site's output and each site's input recorded,

    (out, inputs) = run(params, zs, *args),     δ_site = ∂(uᵀ out)/∂z_site at z = 0,

so one ``jax.vjp`` in z gives every layer's output cotangent and the recorded inputs
its activations, with no parameter gradient formed. ``input_rows`` and ``output_rows``
lay them out as matrices [R, d_in] and [R, d_out] over the layer's R positions (the
pixels of a conv, the leading axes of a dense layer), in the row order of the
weight's matrix layout ``to_matrix(leaf, ops)`` [d_in, d_out], so that the layer is
y_r = a_r W_mat at every position r and ∂f/∂W_mat = Σ_r a_rᵀ δ_r.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jattr.types import Params
from jattr.wrt import param_paths

# Primitives that only rearrange or relabel a weight: a leaf seen through them is
# still that leaf (the ops say how to lay it out).
_RENAME = ("convert_element_type", "copy", "copy_p", "reduce_precision")
_LAYOUT = {"transpose", "reshape", "squeeze", "expand_dims", "broadcast_in_dim"}
# Call-like primitives whose body is searched (and inlined when evaluated).
_LAYOUT_NAMES = tuple(sorted(_LAYOUT))
_CALLS = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "custom_vjp_call_jaxpr", "checkpoint", "remat", "remat2"}


@dataclasses.dataclass(frozen=True)
class Site:
  """One dense or conv contraction with a parameter-leaf weight.

  Attributes:
    key: the equation's index path in the jaxpr (through inlined sub-jaxprs).
    kind: ``"dense"`` or ``"conv"``.
    x_index: which operand (0 or 1) is the activation.
    weight: leaf index of W, or None (a LoRA site on a frozen W).
    weight_ops: ops taking the W leaf to its matrix [d_in, d_out] (``to_matrix``).
    d_in, d_out: the matrix shape.
    out_shape: the site output's shape (at the traced batch size).
    out_dtype: its dtype.
    n_pos: how many of the output's axes are positions (the rest are features).
    x_perm: dense: the activation's axes, positions first, then contracted.
    out_perm: the output's axes, positions first, then features.
    conv: conv: its parameters (window_strides, padding, lhs_dilation,
      rhs_dilation, dimension_numbers, filter_shape) as a hashable tuple.
    bias: leaf index of a bias added to the output, or None.
    lora: (A leaf, B leaf, scale c) of an adapter W + c·A B, or None.
  """

  key: tuple
  kind: str
  x_index: int
  weight: int | None
  weight_ops: tuple
  d_in: int
  d_out: int
  out_shape: tuple
  out_dtype: str = "float32"
  n_pos: int = 1
  x_perm: tuple = ()
  out_perm: tuple = ()
  conv: tuple = ()
  bias: int | None = None
  lora: tuple | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Registry:
  """What ``find_layers`` found.

  Attributes:
    sites: the layer sites, in order of appearance.
    paths: every leaf's path (``jattr.wrt.param_paths``).
    shapes: every leaf's shape.
    unmatched: ``{leaf index: reason}`` for leaves in no site.
    closed: the traced ClosedJaxpr (params leaves first among its inputs).
    out_tree: the tree structure of ``fn``'s output.
  """

  sites: tuple
  paths: tuple
  shapes: tuple
  unmatched: dict
  closed: Any
  out_tree: Any



# ----------------------------------------------------------------- views of leaves

@dataclasses.dataclass(frozen=True)
class _View:
  """A leaf seen through layout ops; ``chain`` replays them (for the bias check)."""

  leaf: int
  ops: tuple
  chain: tuple
  shape: tuple
  size_kept: bool = True


@dataclasses.dataclass(frozen=True)
class _LowRank:
  a: _View
  b: _View
  scale: float
  ops: tuple
  shape: tuple


@dataclasses.dataclass(frozen=True)
class _Adapted:
  base: _View | None
  low: _LowRank
  shape: tuple


class _Const:
  """A value computed from constants only (e.g. a frozen weight closed over by ``wrt``)."""


_CONST = _Const()


@dataclasses.dataclass(frozen=True)
class _SiteOut:
  """A site's output, seen through layout ops (a bias may be added after them)."""

  site: int
  ops: tuple = ()


def _layout_op(prim: str, params: dict, in_shape: tuple, out_shape: tuple):
  """The op of a layout primitive on its input, or None for one that is not a layout."""
  if prim == "transpose":
    return ("transpose", tuple(int(p) for p in params["permutation"]))
  if prim == "reshape":
    if params.get("dimensions") is not None:
      return None
    return ("reshape", tuple(int(d) for d in out_shape))
  if prim in ("squeeze", "expand_dims"):
    return ("reshape", tuple(int(d) for d in out_shape))
  if prim == "broadcast_in_dim":
    if math.prod(out_shape) != math.prod(in_shape):
      return "broadcast"
    return ("reshape", tuple(int(d) for d in out_shape))
  return None


def apply_ops(x, ops: tuple, batch: int = 0):
  """Applies layout ops to ``x`` (with ``batch`` leading axes left alone)."""
  lead = x.shape[:batch]
  for op, arg in ops:
    if op == "transpose":
      x = jnp.transpose(x, tuple(range(batch)) + tuple(batch + p for p in arg))
    else:
      x = x.reshape(lead + tuple(arg))
  return x


def _op_shapes(shape: tuple, ops: tuple) -> list:
  shapes = [tuple(shape)]
  for op, arg in ops:
    shapes.append(tuple(shapes[-1][p] for p in arg) if op == "transpose" else tuple(arg))
  return shapes


def invert_ops(m, ops: tuple, shape: tuple, batch: int = 0):
  """The inverse of ``apply_ops``: from the laid-out array back to ``shape``."""
  shapes = _op_shapes(shape, ops)
  lead = m.shape[:batch]
  for (op, arg), before in zip(reversed(ops), reversed(shapes[:-1])):
    if op == "transpose":
      inv = tuple(int(i) for i in np.argsort(arg))
      m = jnp.transpose(m, tuple(range(batch)) + tuple(batch + p for p in inv))
    else:
      m = m.reshape(lead + before)
  return m


def simplify_ops(ops: tuple, shape: tuple) -> tuple:
  """``ops`` without identity transposes, no-op reshapes and reshapes followed by reshapes."""
  out = []
  current = tuple(shape)
  for op, arg in ops:
    if op == "transpose":
      if tuple(arg) == tuple(range(len(arg))):
        continue
      out.append((op, tuple(arg)))
      current = tuple(current[p] for p in arg)
    else:
      while out and out[-1][0] == "reshape":
        out.pop()
      out.append((op, tuple(arg)))
      current = tuple(arg)
  # a reshape back to the shape before it is no op
  start = tuple(shape)
  if len(out) == 1 and out[0][0] == "reshape" and out[0][1] == start:
    return ()
  return tuple(out)


def _is_identity(ops: tuple, shape: tuple) -> bool:
  probe = np.arange(math.prod(shape)).reshape(shape)
  out = np.asarray(apply_ops(jnp.asarray(probe), ops))
  return out.shape == probe.shape and bool(np.all(out == probe))


# ----------------------------------------------------------------- finding the sites

def _sub_jaxpr(eqn):
  """(jaxpr, consts) of a call-like equation's body, or None."""
  if eqn.primitive.name not in _CALLS:
    return None
  for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(name)
    if sub is None:
      continue
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr, list(sub.consts)
    if isinstance(sub, jcore.Jaxpr):
      return sub, []
  return None


def _shape(v) -> tuple:
  return tuple(v.aval.shape)


def _literal_scalar(v, consts: dict):
  if isinstance(v, jcore.Literal):
    val = v.val
  elif v in consts:
    val = consts[v]
  else:
    return None
  val = np.asarray(val)
  return float(val) if val.size == 1 else None


class _Finder:
  """Walks a jaxpr, tracking which variables are views of which leaves."""

  def __init__(self, shapes: list[tuple]):
    self.shapes = shapes
    self.sites: list[Site] = []
    self.uses: dict[int, list[str]] = {i: [] for i in range(len(shapes))}
    self.bias_of: dict[int, int] = {}

  def _leaves_in(self, info) -> list[int]:
    if isinstance(info, _View):
      return [info.leaf]
    if isinstance(info, _LowRank):
      return [info.a.leaf, info.b.leaf]
    if isinstance(info, _Adapted):
      return ([info.base.leaf] if info.base is not None else []) + [info.low.a.leaf,
                                                                   info.low.b.leaf]
    return []

  def _use(self, info, why: str) -> None:
    for leaf in self._leaves_in(info):
      self.uses[leaf].append(why)

  def walk(self, jaxpr, infos: dict, consts: dict, prefix: tuple) -> list:
    """Walks ``jaxpr`` with ``infos`` for its invars; returns infos of its outvars."""
    env = dict(infos)
    env.update({v: _CONST for v in jaxpr.constvars if v not in env})
    read = lambda v: _CONST if isinstance(v, jcore.Literal) else env.get(v)  # noqa: E731
    for i, eqn in enumerate(jaxpr.eqns):
      key = prefix + (i,)
      prim = eqn.primitive.name
      ins = [read(v) for v in eqn.invars]
      sub = _sub_jaxpr(eqn)
      if sub is not None:
        body, body_consts = sub
        offset = len(eqn.invars) - len(body.invars)
        sub_infos = {bv: ins[offset + j] for j, bv in enumerate(body.invars)
                     if ins[offset + j] is not None}
        sub_consts = {cv: c for cv, c in zip(body.constvars, body_consts)}
        outs = self.walk(body, sub_infos, sub_consts, key)
        for ov, info in zip(eqn.outvars, outs):
          if info is not None:
            env[ov] = info
        continue
      if all(x is _CONST for x in ins):
        env.update({v: _CONST for v in eqn.outvars})
        continue
      consts_in = [x is _CONST for x in ins]
      ins = [None if x is _CONST else x for x in ins]
      if all(x is None for x in ins):
        continue
      out = self._eqn(eqn, prim, ins, key, consts, consts_in)
      if out is not None:
        env[eqn.outvars[0]] = out
    return [read(v) for v in jaxpr.outvars]

  def _eqn(self, eqn, prim, ins, key, consts, consts_in):
    in_shape = _shape(eqn.invars[0])
    if prim in _RENAME + _LAYOUT_NAMES and isinstance(ins[0], _SiteOut):
      if prim in _RENAME:
        return ins[0]
      op = _layout_op(prim, eqn.params, in_shape, _shape(eqn.outvars[0]))
      if op is not None and op != "broadcast":
        return dataclasses.replace(ins[0], ops=ins[0].ops + (op,))
      return None
    if prim in _RENAME and isinstance(ins[0], (_View, _LowRank, _Adapted)):
      info = ins[0]
      if isinstance(info, _View):
        return dataclasses.replace(info, chain=info.chain + ((eqn.primitive, eqn.params),))
      return info
    if prim in _LAYOUT and ins[0] is not None and not isinstance(ins[0], _SiteOut):
      out_shape = _shape(eqn.outvars[0])
      op = _layout_op(prim, eqn.params, in_shape, out_shape)
      info = ins[0]
      if op is None:
        self._use(info, f"used by {prim} with dimensions")
        return None
      if isinstance(info, _View):
        chain = info.chain + ((eqn.primitive, eqn.params),)
        if op == "broadcast":
          return dataclasses.replace(info, chain=chain, shape=out_shape, size_kept=False)
        return dataclasses.replace(info, ops=info.ops + (op,), chain=chain, shape=out_shape)
      if isinstance(info, _LowRank) and op != "broadcast":
        return dataclasses.replace(info, ops=info.ops + (op,), shape=out_shape)
      if isinstance(info, _Adapted) and op != "broadcast":
        base = None if info.base is None else dataclasses.replace(
            info.base, ops=info.base.ops + (op,), shape=out_shape)
        low = dataclasses.replace(info.low, ops=info.low.ops + (op,), shape=out_shape)
        return _Adapted(base, low, out_shape)
      self._use(info, f"used by {prim} of a LoRA product")
      return None
    if prim == "dot_general":
      return self._dot(eqn, ins, key)
    if prim == "conv_general_dilated":
      return self._conv(eqn, ins, key)
    if prim == "mul" and isinstance(ins[0], _LowRank) ^ isinstance(ins[1], _LowRank):
      j = 0 if isinstance(ins[0], _LowRank) else 1
      scale = _literal_scalar(eqn.invars[1 - j], consts)
      if scale is not None and ins[1 - j] is None:
        return dataclasses.replace(ins[j], scale=ins[j].scale * scale)
      self._use(ins[j], "a LoRA product multiplied by a non-constant")
      return None
    if prim == "add":
      return self._add(eqn, ins, consts_in)
    for info in ins:
      if info is not None and not isinstance(info, _SiteOut):
        self._use(info, f"used by {prim}")
    return None

  def _add(self, eqn, ins, consts_in):
    for j in (0, 1):
      a, b = ins[j], ins[1 - j]
      if isinstance(a, _SiteOut) and isinstance(b, _View) and len(self.uses[b.leaf]) == 0:
        site = self.sites[a.site]
        if site.bias is None and _bias_aligned(site, b, self.shapes[b.leaf], a.ops):
          self.sites[a.site] = dataclasses.replace(site, bias=b.leaf)
          self.bias_of[b.leaf] = a.site
          return None
      frozen = a is None and consts_in[j]
      if isinstance(b, _LowRank) and (frozen or (isinstance(a, _View) and a.size_kept)):
        if _shape(eqn.invars[0]) == _shape(eqn.invars[1]):
          return _Adapted(a, b, _shape(eqn.outvars[0]))
    for info in ins:
      if info is not None and not isinstance(info, _SiteOut):
        self._use(info, "used by add")
    return None

  def _weight(self, info):
    """(base view, low rank) of a weight operand, or None if it is not a weight."""
    if isinstance(info, _View) and info.size_kept:
      return info, None
    if isinstance(info, _Adapted):
      return info.base, info.low
    if isinstance(info, _LowRank):
      return None, info
    return None

  def _dot(self, eqn, ins, key):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if isinstance(ins[0], _View) and isinstance(ins[1], _View):
      a, b = ins
      if (a.ops == () and b.ops == () and not lb and len(a.shape) == 2 and len(b.shape) == 2
          and tuple(lc) == (1,) and tuple(rc) == (0,) and a.size_kept and b.size_kept):
        return _LowRank(a, b, 1.0, (), _shape(eqn.outvars[0]))
      self._use(a, "in a dot_general of two parameters")
      self._use(b, "in a dot_general of two parameters")
      return None
    weights = [self._weight(x) if not isinstance(x, _SiteOut) else None for x in ins]
    if weights[0] is not None and weights[1] is not None or all(w is None for w in weights):
      for info in ins:
        if info is not None and not isinstance(info, _SiteOut):
          self._use(info, "used by dot_general, not as the weight of an activation")
      return None
    wi = 0 if weights[0] is not None else 1
    xi = 1 - wi
    wshape = _shape(eqn.invars[wi])
    xshape = _shape(eqn.invars[xi])
    wc, xc = (tuple(lc), tuple(rc)) if wi == 0 else (tuple(rc), tuple(lc))
    wb = lb if wi == 0 else rb
    if wb:
      self._use(ins[wi], "in a dot_general with batch dimensions on the weight")
      return None
    wf = tuple(d for d in range(len(wshape)) if d not in wc)
    xf = tuple(d for d in range(len(xshape)) if d not in xc)
    d_in = math.prod(wshape[d] for d in wc)
    d_out = math.prod(wshape[d] for d in wf)
    n_pos = len(xf)
    # dot_general's output: (lhs free, rhs free); positions are x's free axes.
    if wi == 1:
      out_perm = tuple(range(n_pos + len(wf)))
    else:
      out_perm = tuple(range(len(wf), len(wf) + n_pos)) + tuple(range(len(wf)))
    matrix_ops = (("transpose", wc + wf), ("reshape", (d_in, d_out)))
    return self._site(eqn, ins[wi], weights[wi], key, "dense", xi, matrix_ops, d_in, d_out,
                      n_pos=n_pos, x_perm=xf + xc, out_perm=out_perm)

  def _conv(self, eqn, ins, key):
    p = eqn.params
    weight = self._weight(ins[1]) if not isinstance(ins[1], _SiteOut) else None
    if weight is None or isinstance(ins[0], (_View, _LowRank, _Adapted)):
      for info in ins:
        if info is not None and not isinstance(info, _SiteOut):
          self._use(info, "in a conv_general_dilated, not as its kernel")
      return None
    if p.get("feature_group_count", 1) != 1 or p.get("batch_group_count", 1) != 1:
      self._use(ins[1], "the kernel of a grouped convolution (not covered)")
      return None
    dn = p["dimension_numbers"]
    rhs, out = tuple(dn.rhs_spec), tuple(dn.out_spec)
    wshape = _shape(eqn.invars[1])
    spatial = rhs[2:]
    filter_shape = tuple(wshape[d] for d in spatial)
    d_in = math.prod(filter_shape) * wshape[rhs[1]]
    d_out = wshape[rhs[0]]
    matrix_ops = (("transpose", spatial + (rhs[1], rhs[0])), ("reshape", (d_in, d_out)))
    out_perm = (out[0],) + out[2:] + (out[1],)
    conv = (("window_strides", tuple(p["window_strides"])),
            ("padding", tuple(tuple(x) for x in p["padding"])),
            ("lhs_dilation", tuple(p["lhs_dilation"])),
            ("rhs_dilation", tuple(p["rhs_dilation"])),
            ("dimension_numbers", (tuple(dn.lhs_spec), rhs, out)),
            ("filter_shape", filter_shape))
    return self._site(eqn, ins[1], weight, key, "conv", 0, matrix_ops, d_in, d_out,
                      n_pos=len(out) - 1, out_perm=out_perm, conv=conv)

  def _site(self, eqn, info, weight, key, kind, xi, matrix_ops, d_in, d_out, **kw):
    base, low = weight
    lora = None
    if low is not None:
      if not _is_identity(low.ops + matrix_ops, (d_in, d_out)) or \
          low.a.shape != (d_in, low.a.shape[1]) or low.b.shape != (low.a.shape[1], d_out):
        self._use(info, "a LoRA product laid out differently from the kernel")
        return None
      lora = (low.a.leaf, low.b.leaf, low.scale)
      self.uses[low.a.leaf].append("site")
      self.uses[low.b.leaf].append("site")
    w_leaf = None if base is None else base.leaf
    if base is not None:
      self.uses[base.leaf].append("site")
    site = Site(key=key, kind=kind, x_index=xi, weight=w_leaf,
                weight_ops=simplify_ops((base.ops if base is not None else ()) + matrix_ops,
                                        self.shapes[base.leaf] if base is not None else ()),
                d_in=d_in, d_out=d_out, out_shape=_shape(eqn.outvars[0]),
                out_dtype=str(eqn.outvars[0].aval.dtype), lora=lora, **kw)
    self.sites.append(site)
    return _SiteOut(len(self.sites) - 1)


def _feature_axis(site: Site) -> int:
  return site.out_perm[-1]


def _bias_aligned(site: Site, view: _View, leaf_shape: tuple, out_ops: tuple) -> bool:
  """Is ``view`` a leaf of d_out entries broadcast along the site's feature axis (after
  the layout ops ``out_ops`` applied to the site's output), entry k at feature k?"""
  if math.prod(leaf_shape) != site.d_out or len(site.out_shape) - site.n_pos != 1:
    return False
  axis = _feature_axis(site)
  want = jnp.broadcast_to(
      jnp.arange(site.d_out, dtype=jnp.float32).reshape(
          [site.d_out if d == axis else 1 for d in range(len(site.out_shape))]),
      site.out_shape)
  want = np.asarray(apply_ops(want, out_ops))
  probe = jnp.arange(site.d_out, dtype=jnp.float32).reshape(leaf_shape)
  try:
    for prim, params in view.chain:
      probe = prim.bind(probe, **params)
    probe = np.asarray(jnp.broadcast_to(probe, want.shape))
  except (TypeError, ValueError):
    return False
  return probe.shape == want.shape and bool(np.all(probe == want))


def find_layers(fn: Callable, params: Params, *args) -> Registry:
  """Traces ``fn(params, *args)`` and finds its dense and conv layers.

  Args:
    fn: any function whose first argument is the params pytree; its other
      arguments are traced at the given values' shapes (one example, e.g.
      ``x_t[:1], t[:1]``, keeps the trace small).
    params: the parameters.
    *args: the other arguments.

  Returns:
    A ``Registry``.
  """
  leaves = jax.tree.leaves(params)
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params, *args)
  finder = _Finder([tuple(x.shape) for x in leaves])
  infos = {v: _View(i, (), (), tuple(leaves[i].shape)) for i, v in
           enumerate(closed.jaxpr.invars[:len(leaves)])}
  consts = dict(zip(closed.jaxpr.constvars, closed.consts))
  finder.walk(closed.jaxpr, infos, consts, ())
  used_by_site = {}
  for j, s in enumerate(finder.sites):
    for leaf in (s.weight,) + (s.lora[:2] if s.lora else ()):
      if leaf is not None:
        used_by_site.setdefault(leaf, []).append(j)
  unmatched = {}
  for i in range(len(leaves)):
    others = [u for u in finder.uses[i] if u != "site"]
    if i in finder.bias_of:
      continue
    if i in used_by_site and not others:
      continue
    if i in used_by_site:
      unmatched[i] = f"a layer weight, but also {others[0]} (its gradient is not Σ a δᵀ)"
    elif others:
      unmatched[i] = others[0]
    else:
      unmatched[i] = "not used by the model"
  # A leaf with another use loses its sites: its gradient is not Σ a δᵀ alone.
  sites = tuple(s for s in finder.sites
                if not (s.weight in unmatched or (s.lora and (s.lora[0] in unmatched
                                                              or s.lora[1] in unmatched))))
  for s in finder.sites:
    if s not in sites and s.bias is not None:
      unmatched[s.bias] = "bias of a layer whose weight is unmatched"
  return Registry(sites, tuple(param_paths(params)), tuple(tuple(x.shape) for x in leaves),
                  unmatched, closed, jax.tree.structure(out_shape))


# ----------------------------------------------------------------- evaluating

def _eval_eqn(eqn, invals):
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # jax < 0.9.2: (subfuns, params), subfuns positional
    subfuns, bind_params = bind_params
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  else:  # jax >= 0.9.2: params only (call primitives carry their subfuns in them)
    out = eqn.primitive.bind(*invals, **bind_params)
  return out if eqn.primitive.multiple_results else [out]


def _site_prefixes(registry: Registry) -> set:
  return {s.key[:n] for s in registry.sites for n in range(1, len(s.key))}


def instrument(registry: Registry) -> Callable:
  """``run(params, zs, *args) -> (out, inputs)``: the model with z added at each site.

  ``zs`` is a list with one array per site, shaped like its output
  (``site.out_shape``); ``inputs`` lists each site's activation operand. At
  ``zs`` = 0, ``out`` is ``fn(params, *args)``.
  """
  by_key = {s.key: j for j, s in enumerate(registry.sites)}
  prefixes = _site_prefixes(registry)
  closed = registry.closed

  def run_jaxpr(jaxpr, consts, args, zs, inputs, prefix):
    env = {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = c
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for i, eqn in enumerate(jaxpr.eqns):
      key = prefix + (i,)
      invals = [read(v) for v in eqn.invars]
      if key in prefixes:
        body, body_consts = _sub_jaxpr(eqn)
        offset = len(eqn.invars) - len(body.invars)
        outs = run_jaxpr(body, body_consts, invals[offset:], zs, inputs, key)
      else:
        outs = _eval_eqn(eqn, invals)
        if key in by_key:
          j = by_key[key]
          inputs[j] = invals[registry.sites[j].x_index]
          outs = [outs[0] + zs[j]]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def run(params, zs, *args):
    flat = jax.tree.leaves((params,) + args)
    inputs = [None] * len(registry.sites)
    outs = run_jaxpr(closed.jaxpr, closed.consts, flat, zs, inputs, ())
    return jax.tree.unflatten(registry.out_tree, outs), inputs

  return run


def zero_perturbations(registry: Registry) -> list:
  """One zero array per site, shaped (and typed) like its output."""
  return [jnp.zeros(s.out_shape, s.out_dtype) for s in registry.sites]


# ----------------------------------------------------------------- rows

def input_rows(site: Site, x) -> jax.Array:
  """The layer inputs a_r as rows [R, d_in], in the weight matrix's row order."""
  if site.kind == "dense":
    return jnp.transpose(x, site.x_perm).reshape(-1, site.d_in)
  conv = dict(site.conv)
  lhs, rhs, out = conv["dimension_numbers"]
  patches = jax.lax.conv_general_dilated_patches(
      x, filter_shape=conv["filter_shape"], window_strides=conv["window_strides"],
      padding=conv["padding"], lhs_dilation=conv["lhs_dilation"],
      rhs_dilation=conv["rhs_dilation"],
      dimension_numbers=jax.lax.ConvDimensionNumbers(lhs, rhs, out))
  # Patches come out in the output layout, features ordered (c_in, *filter).
  patches = jnp.transpose(patches, site.out_perm)
  c_in = site.d_in // math.prod(conv["filter_shape"])
  patches = patches.reshape((-1, c_in) + tuple(conv["filter_shape"]))
  nf = len(conv["filter_shape"])
  return jnp.transpose(patches, (0,) + tuple(range(2, 2 + nf)) + (1,)).reshape(-1, site.d_in)


def output_rows(site: Site, y) -> jax.Array:
  """An output-shaped array (e.g. the cotangent δ) as rows [R, d_out]."""
  return jnp.transpose(y, site.out_perm).reshape(-1, site.d_out)


def to_matrix(leaf, ops: tuple, batch: int = 0):
  """A weight leaf (with ``batch`` leading axes) in its site's [d_in, d_out] layout."""
  return apply_ops(leaf, ops, batch)


def describe_unmatched(registry: Registry, min_ndim: int = 2) -> list[str]:
  """``"path [shape]: reason"`` for each unmatched leaf with at least ``min_ndim`` axes."""
  return [f"{registry.paths[i]} {list(registry.shapes[i])}: {why}"
          for i, why in sorted(registry.unmatched.items())
          if len(registry.shapes[i]) >= min_ndim]
