"""Encoded ensembles (Dai & Gifford 2023): attribution, sampling and forgetting by design.

Train M members, member m on the examples {i : A[m, i]} of a boolean design
A ∈ {0, 1}^{M×N} (``design_splits``), each with ``jattr.train.train_many``. Because
the design is known, every member that did *not* see example i is a natural
leave-out model for i, and the attribution of a query q to i is

    τ[q, i] = 1/|M̄_i| Σ_{m ∉ M_i} y_qm  −  1/|M_i| Σ_{m ∈ M_i} y_qm,
    M_i = {m : A[m, i]},  M̄_i = {m : ¬A[m, i]},

with y_qm = f(θ_m; x_q) any measurement of member m on the query
(``ensemble_scores``). Sign convention: with f = the query's loss (as in LDS), τ > 0
means the members that lacked i fit q *worse*, i.e. i is a proponent of q (the
same convention as TRAK, influence and MUCS in jattr).

Designs. ``"random_half"``: each member sees an independent random half of the
groups, so every i is out of a Binomial(M, 1/2) set of members. ``"binary_code"``:
M = 2b members; group g gets a distinct b-bit code c_g, member j < b sees the
groups with bit j of c_g set and member b + j those with bit j clear (the
complement), so every group is left out of exactly b = M/2 members, each group in a
different, known pattern, and any two groups are separated by at least one pair
of members. Groups are blocks of ``group_size`` consecutive examples, or any
labelling passed as ``groups`` (e.g. classes), so one "example" of the design can
be a whole class.

The ensemble is itself a generative model: its denoiser averages the members'
predictions,

    ε̂_ens(x_t, t) = Σ_m w_m ε̂_{θ_m}(x_t, t) / Σ_m w_m,     w ∈ {0, 1}^M,

(``ensemble_apply_fn``; for an ε- or x₀-parameterised model the average of the
outputs is the output of the averaged prediction). *Forgetting* a group G is
exact: keep only the members that never saw any example of G (``forget``), and
the ensemble thereafter holds no information from G at all.

Relation to LDS. A random-half design with M members is exactly LDS's subsets at
α = 1/2, so the subset models trained for LDS (``jattr.bench.lds_cache``) *are* a
random-half ensemble and their measurements y [Q, M] give ``ensemble_scores``
without training anything. Scoring and evaluating on the *same* subsets would be
circular (τ is then fit to the very y it is judged against), so use disjoint
halves of the subsets (``split_members``), or another seed replicate *and* other
subsets.

References:
  Dai, Gifford: "Training Data Attribution for Diffusion Models", 2023
  (arXiv:2306.02174).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jattr.types import ApplyFn, Params

DESIGNS = ("random_half", "binary_code")


# ----------------------------------------------------------------------------- design


def _group_ids(n_examples: int, group_size: int, groups) -> np.ndarray:
  """Dense group ids 0..G−1, one per example."""
  if groups is None:
    if int(group_size) < 1:
      raise ValueError(f"group_size must be >= 1, got {group_size}")
    return np.arange(n_examples) // int(group_size)
  groups = np.asarray(groups)
  if groups.shape != (n_examples,):
    raise ValueError(f"groups must have shape [N]=({n_examples},), got {groups.shape}")
  return np.unique(groups, return_inverse=True)[1].reshape(-1)


def design_splits(n_examples: int, n_members: int,
                  kind: Literal["random_half", "binary_code"] = "random_half", seed: int = 0,
                  group_size: int = 1, groups=None) -> np.ndarray:
  """The design A: which member trains on which example.

  Args:
    n_examples: N.
    n_members: M; even for ``"binary_code"``, which needs 2^(M/2) ≥ G.
    kind: ``"random_half"`` or ``"binary_code"`` (module docstring).
    seed: seeds the random halves, or the assignment of codes to groups.
    group_size: examples per group (consecutive blocks) when ``groups`` is None.
    groups: optional group label per example, [N] (any hashable values); overrides
      ``group_size``.

  Returns:
    Boolean masks [M, N]: member m trains on example i iff ``masks[m, i]``; all
    examples of a group share their column.

  Raises:
    ValueError: on an unknown kind, an odd M or too few members for the code, or
      fewer than two groups.
  """
  if kind not in DESIGNS:
    raise ValueError(f"kind must be one of {DESIGNS}, got {kind!r}")
  if int(n_examples) < 1 or int(n_members) < 2:
    raise ValueError(f"need n_examples >= 1 and n_members >= 2, got {n_examples}, {n_members}")
  gid = _group_ids(int(n_examples), group_size, groups)
  num_groups = int(gid.max()) + 1
  if num_groups < 2:
    raise ValueError(f"need at least 2 groups to split, got {num_groups}")
  rng = np.random.default_rng(seed)
  if kind == "random_half":
    per_group = np.zeros((n_members, num_groups), bool)
    for m in range(n_members):
      per_group[m, rng.permutation(num_groups)[:num_groups // 2]] = True
  else:
    if n_members % 2:
      raise ValueError(f"binary_code needs an even n_members (code and complement), got "
                       f"{n_members}")
    bits = n_members // 2
    if bits < 63 and 2**bits < num_groups:
      raise ValueError(f"binary_code with n_members={n_members} distinguishes 2^{bits} = "
                       f"{2**bits} groups, but there are {num_groups}; use n_members >= "
                       f"{2 * int(np.ceil(np.log2(num_groups)))}")
    space = 2**min(bits, 62)
    codes = (rng.choice(space, num_groups, replace=False) if space <= 1 << 24
             else rng.integers(0, space, num_groups))
    bit = ((codes[None, :] >> np.arange(bits)[:, None]) & 1).astype(bool)  # [b, G]
    per_group = np.concatenate([bit, ~bit], axis=0)
  return per_group[:, gid]


def split_members(n_members: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Two disjoint random halves of the member indices: (score_with, evaluate_on).

  Use the first to compute ``ensemble_scores`` and the second as LDS subsets, so an
  ensemble built from LDS subset models is never judged on its own members.
  """
  perm = np.random.default_rng(seed).permutation(int(n_members))
  half = int(n_members) // 2
  return np.sort(perm[:half]), np.sort(perm[half:])


# ----------------------------------------------------------------------------- scores


def ensemble_scores(measurements, masks) -> jax.Array:
  """τ[q, i] = mean_{m: ¬A[m,i]} y[q, m] − mean_{m: A[m,i]} y[q, m].

  Args:
    measurements: y [Q, M], member m's measurement of query q (e.g. its loss).
    masks: the design A, boolean [M, N].

  Returns:
    τ, [Q, N] (τ > 0: proponent when y is a loss).

  Raises:
    ValueError: on mismatched shapes, or an example seen by all members or by none
      (its contrast is undefined).
  """
  y = jnp.asarray(measurements)
  a = np.asarray(masks)
  if a.dtype != bool or a.ndim != 2:
    raise ValueError(f"masks must be a boolean [M, N] array, got {a.dtype} {a.shape}")
  if y.ndim != 2 or y.shape[1] != a.shape[0]:
    raise ValueError(f"measurements must be [Q, M={a.shape[0]}], got {y.shape}")
  n_in = a.sum(axis=0)
  bad = np.flatnonzero((n_in == 0) | (n_in == a.shape[0]))
  if bad.size:
    raise ValueError(f"examples {bad[:5].tolist()} (of {bad.size}) are seen by all members or "
                     f"by none; every example needs members with and without it")
  inside = jnp.asarray(a, y.dtype)
  mean_in = (y @ inside) / jnp.asarray(n_in, y.dtype)
  mean_out = (y @ (1 - inside)) / jnp.asarray(a.shape[0] - n_in, y.dtype)
  return mean_out - mean_in


def ensemble_score_fn(masks, measurements_by_split: dict, members=None):
  """An LDS-harness ``score_fn(hparams, queries)`` from already measured members.

  ``jattr.eval.selection.select_and_evaluate`` hands a score function the query images
  and the split's name only; this one looks the split's member measurements up by
  that name and returns ``ensemble_scores`` over the chosen members.

  Args:
    masks: the design of all members, boolean [M, N] (e.g. an LDS cache's masks).
    measurements_by_split: split name -> y [Q, M] or [Q, M, S] (seed replicates
      are averaged), e.g. ``{name: qs.y for name, qs in cache.splits.items()}``.
    members: indices of the members to score with (``split_members(M)[0]``); the
      rest must then be the only subsets the LDS is computed on. None: all (only
      for a design whose members are NOT the evaluation subsets).

  Returns:
    ``score_fn(hparams, queries) -> τ [Q, N]``; ``hparams`` is ignored.
  """
  masks = np.asarray(masks, bool)
  members = np.arange(masks.shape[0]) if members is None else np.asarray(members)

  def score_fn(hparams, queries):
    name = queries.name
    if name not in measurements_by_split:
      raise ValueError(f"no member measurements for the {name!r} split; have "
                       f"{sorted(measurements_by_split)}")
    y = np.asarray(measurements_by_split[name], np.float64)
    y = y.mean(axis=-1) if y.ndim == 3 else y
    if y.shape[0] != queries.images.shape[0]:
      raise ValueError(f"split {name!r}: {y.shape[0]} measured queries, "
                       f"{queries.images.shape[0]} query images")
    return np.asarray(ensemble_scores(y[:, members], masks[members]))

  return score_fn


# ----------------------------------------------------------------------------- the ensemble


class EnsembleParams(NamedTuple):
  """The "params" of an ensemble denoiser: stacked members and their weights.

  Attributes:
    members: the members' params, every leaf with a leading axis M.
    weights: w ∈ {0, 1}^M (or any non-negative weights), [M].
  """

  members: Params
  weights: jax.Array


def ensemble_params(stacked_params: Params, member_mask=None) -> EnsembleParams:
  """Bundles stacked member params with a member selection.

  Args:
    stacked_params: params with a leading member axis M (``train_many``'s
      ``state.params`` or ``state.ema_params``).
    member_mask: boolean [M] of the members to average (``forget``); None: all.

  Returns:
    ``EnsembleParams`` for ``ensemble_apply_fn``.
  """
  leaves = jax.tree.leaves(stacked_params)
  if not leaves:
    raise ValueError("stacked_params is empty")
  m = leaves[0].shape[0]
  w = np.ones(m, bool) if member_mask is None else np.asarray(member_mask)
  if w.shape != (m,):
    raise ValueError(f"member_mask must have shape [M]=({m},), got {w.shape}")
  if not np.any(w):
    raise ValueError("member_mask selects no member: nothing is left to sample from")
  return EnsembleParams(stacked_params, jnp.asarray(w, leaves[0].dtype))


def ensemble_apply_fn(apply_fn: ApplyFn) -> ApplyFn:
  """The ensemble denoiser: the weighted mean of the members' outputs.

      out(x_t, t) = Σ_m w_m apply_fn(θ_m, x_t, t) / Σ_m w_m

  Args:
    apply_fn: one member's ``apply_fn(params, x_t, t)``, or
      ``apply_fn(params, x_t, t, cond)`` for a conditional model.

  Returns:
    ``apply(ens: EnsembleParams, x_t, t)`` (``apply(ens, x_t, t, cond)`` when called
    with a condition, every member seeing the same one), usable wherever an
    ``ApplyFn`` is, e.g.
    ``ddpm_sample(ensemble_apply_fn(apply_fn), ensemble_params(stacked, mask), ...)``;
    the selection is an argument, so one compiled sampler serves every forget set.
  """

  def apply(ens: EnsembleParams, x_t: jax.Array, t: jax.Array, *cond) -> jax.Array:
    args = (x_t, t) + cond
    outs = jax.vmap(apply_fn, in_axes=(0,) + (None,) * len(args))(ens.members, *args)
    w = ens.weights.astype(outs.dtype)
    return jnp.tensordot(w, outs, axes=1) / jnp.sum(w)

  return apply


def forget(masks, group) -> np.ndarray:
  """The members that never saw any example of ``group``.

  Args:
    masks: the design A, boolean [M, N].
    group: the examples to forget: int indices, or a boolean mask [N].

  Returns:
    Boolean member mask [M] for ``ensemble_params``.

  Raises:
    ValueError: if every member saw some example of the group.
  """
  a = np.asarray(masks, bool)
  g = np.asarray(group)
  if g.dtype == bool:
    if g.shape != (a.shape[1],):
      raise ValueError(f"a boolean group must have shape [N]=({a.shape[1]},), got {g.shape}")
    g = np.flatnonzero(g)
  g = g.reshape(-1).astype(np.int64)
  if g.size and (g.min() < 0 or g.max() >= a.shape[1]):
    raise ValueError(f"group indices must be in [0, {a.shape[1]}), got min {g.min()}, "
                     f"max {g.max()}")
  keep = ~a[:, g].any(axis=1)
  if not keep.any():
    raise ValueError(f"every one of the {a.shape[0]} members saw some of the {g.size} examples; "
                     f"none is left after forgetting them (use a design with this group)")
  return keep
