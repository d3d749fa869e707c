"""Chunked == unchunked, on a denoiser with native convolutions, and progress totals.

Eager calls with chunk_size < N run a host loop over one compiled chunk program
(``jattr.grads.loop_chunks``); under ``jit`` the same functions run ``lax.map``
(``map_chunks``). Both must give the unchunked result: float64, a tiny conv net
(``lax.conv_general_dilated``), N = 7 with chunks of 3, so the last chunk is the
shifted one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import tiny_apply, tiny_init

from jattr import diffusion
from jattr.curvature import diagonal, ekfac, ggn, kfac
from jattr.diffusion.measurements import measurement_fn
from jattr.eval import measure
from jattr.features import (ProjectionConfig, StructuredConfig, featurize, projection_matrix,
                            structured_featurize)
from jattr.features.structured import plain_layer
from jattr.grads import per_example as pe
from jattr.layers import Conv
from jattr.methods import influence as inf
from jattr.methods import trak

SCHED = diffusion.linear(50)
SHAPE = (4, 4, 1)
N = 7
CHUNK = 3
TIGHT = dict(rtol=1e-11, atol=1e-13)


class Calls(list):
  """A ``jattr.progress`` callback that records its calls."""

  def __call__(self, desc, done, total, **metrics):
    self.append((desc, done, total))


@pytest.fixture
def problem(x64):
  params = jax.tree.map(lambda v: v.astype(jnp.float64), tiny_init(jax.random.key(0)))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (N, *SHAPE)))
  draws = diffusion.fixed_draws(jax.random.key(1), 3, SHAPE, SCHED.num_timesteps)
  draws = draws._replace(eps=draws.eps.astype(jnp.float64))
  loss = measurement_fn("loss", tiny_apply, SCHED, draws)
  return params, x, draws, loss


def _close(a, b, **tol):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, **(tol or TIGHT)), a, b)


def test_per_example_grads_host_loop_and_lax_map_match_unchunked(problem):
  params, x, _, loss = problem
  want = pe.per_example_grads(loss, params, x)
  calls = Calls()
  got = pe.per_example_grads(loss, params, x, chunk_size=CHUNK, progress=calls)
  _close(got, want)
  assert calls == [("per-example gradients", 3, N), ("per-example gradients", 6, N),
                   ("per-example gradients", N, N)]
  traced = jax.jit(lambda p, e: pe.per_example_grads(loss, p, e, chunk_size=CHUNK))(params, x)
  _close(traced, want)
  flat = pe.per_example_flat_grads(loss, params, x, chunk_size=CHUNK)
  _close(flat, pe.flatten_per_example(want))
  # and against a Python loop of jax.grad, example by example
  _close(jax.tree.map(lambda g: g[5], got), jax.grad(loss)(params, x[5]))


def test_loop_chunks_numpy_input_and_chunk_at_least_n(problem):
  params, x, _, loss = problem
  want = pe.per_example_flat_grads(loss, params, x)
  _close(pe.per_example_flat_grads(loss, params, np.asarray(x), chunk_size=2), want)
  calls = Calls()
  _close(pe.per_example_flat_grads(loss, params, x, chunk_size=N + 5, progress=calls), want)
  assert calls == [("per-example gradients", N, N)]
  with pytest.raises(ValueError, match="leading axis chunk_size"):
    pe.loop_chunks(lambda a, e: jnp.sum(e), None, x, chunk_size=2)


def test_sum_chunks_counts_every_row_once(x64):
  x = jnp.arange(11.0)
  kernel = lambda scale, chunk, mask: jnp.sum(jnp.where(mask, scale * chunk, 0.0))  # noqa: E731
  calls = Calls()
  total = pe.sum_chunks(kernel, 2.0, x, chunk_size=4, progress=calls, desc="sum")
  assert float(total) == 2.0 * float(jnp.sum(x))
  assert calls == [("sum", 4, 11), ("sum", 8, 11), ("sum", 11, 11)]
  again = pe.sum_chunks(kernel, 1.0, x, chunk_size=4, init=total)
  assert float(again) == 3.0 * float(jnp.sum(x))


def test_in_trace():
  assert not pe.in_trace(jnp.ones(2))
  assert bool(jax.jit(lambda v: pe.in_trace(v) * v)(jnp.ones(2))[0])
  assert jax.vmap(lambda v: jnp.float32(pe.in_trace(v)))(jnp.ones(2))[0] == 1.0


def test_featurize_chunked_equals_unchunked_with_progress(problem):
  params, x, _, loss = problem
  config = ProjectionConfig(dim=16, seed=3, block_size=8)
  want = featurize(loss, params, x, config)
  calls = Calls()
  got = featurize(loss, params, x, config, chunk_size=CHUNK, progress=calls)
  _close(got, want)
  assert [c[1] for c in calls] == [3, 6, 7] and {c[2] for c in calls} == {N}
  assert {c[0] for c in calls} == {"featurize"}
  _close(jax.jit(lambda p, e: featurize(loss, p, e, config, chunk_size=CHUNK))(params, x), want)
  # the projection of the exact per-example gradients
  g = pe.per_example_flat_grads(loss, params, x)
  _close(want, g @ projection_matrix(config, g.shape[1], jnp.float64))


def test_structured_featurize_chunked_equals_unchunked(problem):
  params, x, draws, _ = problem

  def fn(p, x0, layer):
    def apply_fn(q, xt, t):
      h = layer("conv1", xt, q["conv1"], Conv()) + (t[:, None, None, None] / 50.0) * q["temb"]
      return layer("conv2", jnp.tanh(h), q["conv2"], Conv())
    return measurement_fn("loss", apply_fn, SCHED, draws)(p, x0)

  config = StructuredConfig(dim_in=3, dim_out=2, seed=1)
  want = structured_featurize(fn, params, x, config)
  calls = Calls()
  _close(structured_featurize(fn, params, x, config, chunk_size=CHUNK, progress=calls), want)
  assert calls[-1][1:] == (N, N) and len(calls) == 3
  assert fn(params, x[0], plain_layer).shape == ()


def test_featurize_rejects_nonfinite_params(problem):
  params, x, _, loss = problem
  bad = {**params, "temb": params["temb"].at[0].set(jnp.nan)}
  with pytest.raises(ValueError, match=r"params hold 1 non-finite"):
    featurize(loss, bad, x, ProjectionConfig(dim=4), chunk_size=CHUNK)
  # under jit there are no values to check: the check is skipped, not an error
  jax.jit(lambda p: featurize(loss, p, x, ProjectionConfig(dim=4)))(bad)


def test_measure_loss_chunked_equals_unchunked_and_members(problem):
  params, x, draws, _ = problem
  want = measure.measure_loss(tiny_apply, params, SCHED, x, draws, query_chunk=N)
  _close(measure.measure_loss(tiny_apply, params, SCHED, x, draws, query_chunk=CHUNK), want)
  stacked = jax.tree.map(lambda v: jnp.stack([v, 0.5 * v]), params)
  fn = measure.member_measure_fn(tiny_apply, SCHED, draws, query_chunk=CHUNK)
  y = fn(stacked, x)
  assert y.shape == (N, 2)
  _close(y[:, 0], want)
  half = jax.tree.map(lambda v: 0.5 * v, params)
  _close(y[:, 1], measure.measure_loss(tiny_apply, half, SCHED, x, draws))
  _close(jax.jit(fn)(stacked, x), y)  # the traced path (lax.map over models) composes


def test_precondition_and_influence_chunked_equal_unchunked(problem):
  params, x, draws, _ = problem
  state = diagonal.fit_diagonal(tiny_apply, params, SCHED, x, draws,
                                estimation_mode="ggn_exact")
  ivp = inf.inverse_vp_fn(state, 1e-3)
  qg = pe.per_example_grads(measurement_fn("loss", tiny_apply, SCHED, draws), params, x[:5])
  want = inf.precondition(qg, ivp)
  _close(inf.precondition(qg, ivp, chunk_size=2), want)
  plain = lambda v: jax.tree.map(lambda a: 2.0 * a, v)  # noqa: E731  (not a Partial)
  _close(inf.precondition(qg, plain, chunk_size=2), inf.precondition(qg, plain))
  full = inf.influence(tiny_apply, params, SCHED, draws, x, x[:5], state, damping=1e-3)
  calls = Calls()
  out = np.zeros((5, N))
  chunked = inf.influence(tiny_apply, params, SCHED, draws, x, x[:5], state, damping=1e-3,
                          tile_size=4, chunk_size=CHUNK, out=out, progress=calls)
  _close(chunked, full)
  assert calls == [("influence", 4, N), ("influence", N, N)]


def test_curvature_accumulation_chunked_equals_unchunked_with_progress(problem):
  params, x, draws, _ = problem
  want = diagonal.fit_diagonal(tiny_apply, params, SCHED, x, draws, estimation_mode="ggn_exact",
                               batch_size=4)
  calls = Calls()
  got = diagonal.fit_diagonal(tiny_apply, params, SCHED, x, draws, estimation_mode="ggn_exact",
                              batch_size=4, chunk_size=5, progress=calls)
  _close(got, want)
  assert calls == [("diagonal", 4, N), ("diagonal", N, N)]
  rows = ggn.ggn_sqrt_grads(tiny_apply, params, SCHED, x[:2], draws, estimation_mode="ggn_exact")
  _close(ggn.ggn_sqrt_grads(tiny_apply, params, SCHED, x[:2], draws,
                            estimation_mode="ggn_exact", chunk_size=7), rows)
  sampled = dict(estimation_mode="ggn_curvature_prop", key=jax.random.key(4), batch_size=3)
  _close(diagonal.fit_diagonal(tiny_apply, params, SCHED, x, draws, chunk_size=2, **sampled),
         diagonal.fit_diagonal(tiny_apply, params, SCHED, x, draws, **sampled))


def test_ggn_matvec_host_loop_and_scan_match_unchunked(problem):
  params, x, draws, _ = problem
  v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params)
  want = ggn.ggn_matvec(tiny_apply, params, SCHED, x, draws, v)
  _close(ggn.ggn_matvec(tiny_apply, params, SCHED, x, draws, v, chunk_size=CHUNK), want)
  traced = jax.jit(lambda p, w: ggn.ggn_matvec(tiny_apply, p, SCHED, x, draws, w,
                                               chunk_size=CHUNK))(params, v)
  _close(traced, want)


def test_kfac_and_ekfac_report_progress(problem):
  params, x, draws, _ = problem
  calls = Calls()
  k_state = kfac.fit_kfac(tiny_apply, params, SCHED, x, draws, batch_size=3, progress=calls)
  kfac_calls = [c for c in calls if c[0] == "kfac"]
  assert kfac_calls == [("kfac", 3, N), ("kfac", 6, N), ("kfac", N, N)]
  calls.clear()
  e_state = ekfac.fit_ekfac(tiny_apply, params, SCHED, x, draws, k_state, batch_size=4,
                            chunk_size=5, progress=calls)
  assert calls == [("ekfac", 4, N), ("ekfac", N, N)]
  _close(e_state, ekfac.fit_ekfac(tiny_apply, params, SCHED, x, draws, k_state, batch_size=4),
         rtol=1e-10, atol=1e-14)


def test_trak_score_out_reports_each_tile(x64):
  rng = np.random.default_rng(0)
  phi, phiq = jnp.asarray(rng.standard_normal((9, 4))), jnp.asarray(rng.standard_normal((5, 4)))
  state = trak.trak_fit(phi)
  calls = Calls()
  out = np.zeros((5, 9))
  trak.trak_score(state, phiq, tile=(2, 4), out=out, progress=calls)
  # ⌈5/2⌉ · ⌈9/4⌉ = 9 tiles
  assert [c[1] for c in calls] == list(range(1, 10)) and {c[:1] + c[2:] for c in calls} == {
      ("scores", 9)}
  np.testing.assert_allclose(out, trak.trak_score(state, phiq), rtol=1e-12)
  calls.clear()
  trak.trak_score(state, phiq, progress=calls)  # one compiled program: no host loop to report
  assert calls == []


_COMPILES = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kw: _COMPILES.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def test_a_second_call_compiles_nothing(problem):
  """Calling a method again on the same model (a new measurement_fn, a new fit, a new
  influence call) reuses every compiled program: no backend compile at all."""
  params, x, draws, _ = problem
  sched = SCHED

  def run():
    f = measurement_fn("square_norm", tiny_apply, sched, draws)  # a new object every call
    phi = featurize(f, params, x, ProjectionConfig(16, "sparse"), chunk_size=3)
    kf = kfac.fit_kfac(tiny_apply, params, sched, x, draws, batch_size=4, chunk_size=5)
    ek = ekfac.fit_ekfac(tiny_apply, params, sched, x, draws, kf, batch_size=4)
    dg = diagonal.fit_diagonal(tiny_apply, params, sched, x, draws)
    tau = inf.influence(tiny_apply, params, sched, draws, x, x[:2], ek, chunk_size=3)
    return phi, dg, tau

  first = jax.block_until_ready(run())
  _COMPILES.clear()
  second = jax.block_until_ready(run())
  assert _COMPILES == [], f"{len(_COMPILES)} programs compiled again"
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
    np.testing.assert_array_equal(a, b)
