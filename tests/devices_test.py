"""Data-parallel stages on 1, 2, 4 and 8 devices give the single-device numbers.

Run with forced CPU devices (CI's devices stage does):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest -m devices tests/devices_test.py

The module asks for 8 forced host devices itself when the backend has not started
yet. Everything is float64. A per-example result (features, gradients, score
columns, a retrained member, a measurement) must equal the single-device result to
1e-12. A reduction over examples (K-FAC factors, the dense and the sketched GGN)
adds partial sums in another order, so it must equal it to a relative 1e-10.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from jattr import devices  # noqa: E402
from jattr.curvature import dense, kfac, sketch  # noqa: E402
from jattr.diffusion import draws as draws_lib  # noqa: E402
from jattr.diffusion import measurements, schedules  # noqa: E402
from jattr.eval import measure  # noqa: E402
from jattr.features.projection import ProjectionConfig, featurize  # noqa: E402
from jattr.grads.per_example import flatten_per_example, per_example_grads  # noqa: E402
from jattr.methods import influence, trak  # noqa: E402
from jattr.train import TrainConfig, train_many  # noqa: E402
from toy_models import tiny_apply, tiny_init  # noqa: E402

pytestmark = pytest.mark.devices

COUNTS = (1, 2, 4, 8)
T = 50
SHAPE = (4, 4, 1)


def _need(d):
  if len(jax.devices()) < d:
    pytest.fail(f"needs {d} devices, the backend has {len(jax.devices())}: run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count=8 (the backend started "
                f"before this module could set it)")
  return devices.data_mesh(d)


def mlp_apply(p, x, t):
  b = x.shape[0]
  h = jnp.concatenate([x.reshape(b, -1), t[:, None].astype(x.dtype) / T], axis=1)
  h = jnp.tanh(h @ p["l1"]["w"] + p["l1"]["b"])
  return (h @ p["l2"]["w"] + p["l2"]["b"]).reshape(x.shape)


def mlp_params(key, hidden=6):
  k = jax.random.split(key, 4)
  d = int(np.prod(SHAPE))
  return {"l1": {"w": jax.random.normal(k[0], (d + 1, hidden)),
                 "b": 0.1 * jax.random.normal(k[1], (hidden,))},
          "l2": {"w": jax.random.normal(k[2], (hidden, d)) / np.sqrt(hidden),
                 "b": 0.1 * jax.random.normal(k[3], (d,))}}


@pytest.fixture(scope="module")
def problem():
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    x0 = np.asarray(jax.random.normal(keys[0], (13,) + SHAPE))  # 13: no D divides it
    queries = np.asarray(jax.random.normal(keys[1], (5,) + SHAPE))
    draws = draws_lib.fixed_draws(keys[2], 3, SHAPE, T, timesteps="random", dtype=jnp.float64)
    return {"schedule": schedules.linear(T), "x0": x0, "queries": queries, "draws": draws,
            "mlp": mlp_params(keys[3]),
            "conv": jax.tree.map(lambda a: a.astype(jnp.float64), tiny_init(keys[4]))}


def _close(a, b, rtol=1e-12):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("d", COUNTS)
@pytest.mark.parametrize("model", ["mlp", "conv"])  # conv: native lax.conv, plain-dict params
def test_features_and_grads_match_one_device(x64, problem, d, model):
  mesh = _need(d)
  apply_fn = mlp_apply if model == "mlp" else tiny_apply
  params, x0 = problem[model], problem["x0"]
  fn = measurements.measurement_fn("loss", apply_fn, problem["schedule"], problem["draws"])
  pc = ProjectionConfig(dim=16, kind="sparse", seed=0, block_size=32, nonzeros=2)
  ref = featurize(fn, params, x0, pc, chunk_size=3)
  got = featurize(fn, params, x0, pc, chunk_size=3, mesh=mesh)
  assert got.shape == ref.shape
  _close(got, ref)
  _close(per_example_grads(fn, params, x0, chunk_size=2, mesh=mesh),
         per_example_grads(fn, params, x0, chunk_size=2))
  with devices.use_mesh(mesh):  # the ambient way, chunk_size=None: one chunk per device
    _close(featurize(fn, params, x0, pc), ref)


@pytest.mark.parametrize("d", COUNTS)
def test_curvature_sums_match_one_device(x64, problem, d):
  mesh = _need(d)
  s, x0, draws, params = problem["schedule"], problem["x0"], problem["draws"], problem["mlp"]
  ref_g = dense.dense_ggn(mlp_apply, params, s, x0, draws, batch_size=4)
  _close(dense.dense_ggn(mlp_apply, params, s, x0, draws, batch_size=4, mesh=mesh), ref_g,
         rtol=1e-10)
  ref_k = kfac.fit_kfac(mlp_apply, params, s, x0, draws, estimation_mode="ggn_exact",
                        chunk_size=3)
  pc = ProjectionConfig(dim=8, kind="gaussian", seed=2)
  ref_s = sketch.sketch_gram(mlp_apply, params, s, x0, draws, pc, estimation_mode="ggn_exact",
                             chunk_size=3)
  with devices.use_mesh(mesh):
    got_k = kfac.fit_kfac(mlp_apply, params, s, x0, draws, estimation_mode="ggn_exact",
                          chunk_size=3)
    got_s = sketch.sketch_gram(mlp_apply, params, s, x0, draws, pc,
                               estimation_mode="ggn_exact", chunk_size=3)
  # K-FAC keeps eigendecompositions (signs and rotations within repeated eigenvalues
  # are arbitrary): compare the operator it defines
  v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params)
  _close(kfac.kfac_matvec(got_k, v), kfac.kfac_matvec(ref_k, v), rtol=1e-10)
  _close(got_s, ref_s, rtol=1e-10)


@pytest.mark.parametrize("d", COUNTS)
def test_scores_match_one_device(x64, problem, d):
  mesh = _need(d)
  s, x0, q, draws, params = (problem[k] for k in ("schedule", "x0", "queries", "draws", "mlp"))
  fn = measurements.measurement_fn("loss", mlp_apply, s, draws)
  pc = ProjectionConfig(dim=16, kind="gaussian", seed=1)
  phi, phi_q = featurize(fn, params, x0, pc), featurize(fn, params, q, pc)
  state = trak.trak_fit(phi, damping=0.1)
  ref_t = trak.trak_score(state, phi_q, tile=(2, 4))
  curv = kfac.fit_kfac(mlp_apply, params, s, x0, draws, estimation_mode="ggn_exact")
  ref_i = influence.influence(mlp_apply, params, s, draws, x0, q, curv, tile_size=4,
                              chunk_size=3)
  with devices.use_mesh(mesh):
    _close(trak.trak_score(state, phi_q, tile=(2, 4)), ref_t)
    _close(influence.influence(mlp_apply, params, s, draws, x0, q, curv, tile_size=4,
                               chunk_size=3), ref_i)


@pytest.mark.parametrize("d", COUNTS)
def test_train_many_and_measure_match_one_device(x64, problem, d):
  mesh = _need(d)
  s, x0, draws = problem["schedule"], problem["x0"], problem["draws"]
  x0 = np.clip(x0, -1, 1)
  init = lambda k: mlp_params(k, hidden=4)  # noqa: E731
  masks = np.random.default_rng(0).random((5, x0.shape[0])) < 0.5  # 5 members: D ∤ 5
  cfg = TrainConfig(num_steps=4, batch_size=4, learning_rate=1e-2, warmup_steps=1,
                    segment_steps=2)
  ref = train_many(mlp_apply, init, s, x0, masks, np.arange(5), cfg, strategy="map")
  got = train_many(mlp_apply, init, s, x0, masks, np.arange(5), cfg, strategy="map", mesh=mesh)
  _close(got.state.params, ref.state.params)
  np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-12)
  ref_y = measure.measure_members(mlp_apply, ref.state.params, s, problem["queries"], draws,
                                  query_chunk=2)
  with devices.use_mesh(mesh):
    got_y = measure.measure_members(mlp_apply, ref.state.params, s, problem["queries"], draws,
                                    query_chunk=2)
  _close(got_y, ref_y)


def test_jax_ambient_mesh_and_a_model_axis(x64, problem):
  """``jax.set_mesh`` is honoured; parameters sharded over "model" stay sharded."""
  _need(8)
  s, x0, draws, params = problem["schedule"], problem["x0"], problem["draws"], problem["mlp"]
  fn = measurements.measurement_fn("loss", mlp_apply, s, draws)
  pc = ProjectionConfig(dim=16, kind="gaussian", seed=0)
  ref = featurize(fn, params, x0, pc, chunk_size=3)
  with jax.set_mesh(devices.data_mesh(4)):
    _close(featurize(fn, params, x0, pc, chunk_size=3), ref)
  mesh = devices.data_mesh(8, model=2)  # 4 data × 2 model
  col = NamedSharding(mesh, PartitionSpec(None, devices.MODEL))
  sharded = {"l1": {"w": jax.device_put(params["l1"]["w"], col), "b": params["l1"]["b"]},
             "l2": params["l2"]}
  _close(featurize(fn, sharded, x0, pc, chunk_size=3, mesh=mesh), ref)


def test_a_mesh_without_a_data_axis_is_refused():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
  with pytest.raises(ValueError, match="'data'"):
    with devices.use_mesh(mesh):
      pass
  with pytest.raises(ValueError, match="num_devices"):
    devices.data_mesh(len(jax.devices()) + 1)


def test_flatten_after_sharded_grads(x64, problem):
  """Sharded outputs come back on one device: later single-device code just works."""
  mesh = _need(4)
  fn = measurements.measurement_fn("loss", mlp_apply, problem["schedule"], problem["draws"])
  g = flatten_per_example(per_example_grads(fn, problem["mlp"], problem["x0"], mesh=mesh))
  assert len(g.devices()) == 1
  assert g.shape[0] == problem["x0"].shape[0]


def test_lds_cache_and_a_method_on_a_mesh_match_one_device(tmp_path):
  """The harness end to end on 4 devices, in float32 as it runs: the retrained
  members, the generated samples and the measurements equal the one-device build's
  to float32 rounding. TRAK's scores agree to 1% of their scale: features of a
  chunk of 4 and of 16 examples differ in the last bits, and (ΦᵀΦ + λI)⁻¹ at a small
  λ amplifies that (float64 scores agree to 1e-12: test_scores_match_one_device)."""
  from jattr.bench import lds_cache  # pylint: disable=import-outside-toplevel
  from jattr.bench.registry import method_factory  # pylint: disable=import-outside-toplevel
  from toy_models import TINY_LDS_SPEC  # pylint: disable=import-outside-toplevel
  mesh = _need(4)
  model = (tiny_init, tiny_apply)
  ref = lds_cache.build(TINY_LDS_SPEC, tmp_path / "one", model=model, progress=False)
  with devices.use_mesh(mesh):
    got = lds_cache.build(TINY_LDS_SPEC, tmp_path / "four", model=model, progress=False)
  _close(got.full_params, ref.full_params, rtol=1e-6)
  for name, split in ref.splits.items():
    np.testing.assert_allclose(got.splits[name].queries.images, split.queries.images,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.splits[name].y, split.y, rtol=1e-5, atol=1e-6)
  _, factory = method_factory("trak", None)
  score_ref, grid = factory(ref)
  with devices.use_mesh(mesh):
    score_got, _ = method_factory("trak", None)[1](got)
  hp = list(grid)[0] if grid else {}
  queries = ref.splits["test"].queries
  a, b = np.asarray(score_got(hp, queries)), np.asarray(score_ref(hp, queries))
  assert np.max(np.abs(a - b)) < 1e-2 * np.max(np.abs(b))


def test_every_command_takes_devices(monkeypatch):
  """``jattr CMD --devices D`` runs the command inside a D-device mesh."""
  from jattr import cli  # pylint: disable=import-outside-toplevel
  seen = {}
  parser = cli.build_parser()
  for name, sub in parser._subparsers._group_actions[0].choices.items():  # noqa: SLF001
    assert any("--devices" in a.option_strings for a in sub._actions), name  # noqa: SLF001

  def record(args):
    seen["mesh"] = devices.current_mesh()
  monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser, record))
  assert cli.main(["report", "--scores", "x.npz", "--devices", "2"]) == 0
  assert devices.data_size(seen["mesh"]) == 2
  assert cli.main(["report", "--scores", "x.npz"]) == 0
  assert seen["mesh"] is None


def _with_func(parser, func):
  for sub in parser._subparsers._group_actions[0].choices.values():  # noqa: SLF001
    sub.set_defaults(func=func)
  return parser


@pytest.mark.parametrize("bad", [0, -2, "most", 1.5, True])
def test_a_bad_devices_value_is_refused(bad):
  from jattr.bench import drivers  # pylint: disable=import-outside-toplevel
  from jattr.io import guard  # pylint: disable=import-outside-toplevel
  with pytest.raises(guard.ConfigError, match="devices"):
    drivers.ExperimentConfig(spec={}, devices=bad)
  assert drivers.ExperimentConfig(spec={}, devices="all").devices == "all"
