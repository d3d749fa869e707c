"""bf16 options: per-example gradients in bf16 (``ProjectionConfig.grad_dtype``) and
bf16 feature storage (``FeatureStore.open(dtype="bfloat16")``).

Measured on the tiny conv denoiser below (f = loss, K = 4, k = 64): the bf16-gradient
features differ from the float32 ones by 0.44% (dense Rademacher P) and 0.41% (sparse
P) relative (Frobenius; worst row 0.49% / 0.53%), while the features of another model
(every parameter moved by 0.1) differ by 58% / 49%; the bound tested, 2%, sits
between the two, and a lower bound of 1e-4 catches gradients left in float32. (On the
trained digits benchmark UNet, k = 4096, the error is larger, 2-12% depending on f,
benchmarks/results/precision_digits.json, with no effect on LDS: docs/results.md; on
an untrained 2-level UNet of 8×8 images it measured 0.7-1.1%.)
"""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from toy_models import tiny_apply

from jattr.bench import gradient_methods as gm
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import measurements, schedules
from jattr.features import projection as proj
from jattr.grads import per_example as pe
from jattr.io import feature_store as fs_lib
from jattr.io import hashing
from jattr.io.feature_store import FeatureStore
from jattr.runs import features as run_features
from jattr.runs import stores

SHAPE = (6, 6, 1)
BF16_BOUND = 0.02
"""Relative error bound of bf16-gradient features (measured ≈ 0.005; another model ≈ 0.4)."""


def _normal(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _jitter(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                      params)


@pytest.fixture(scope="module")
def model():
  """A two-layer conv denoiser (tests/toy_models.py' shapes) and 10 images; numpy
  draws and weights (jax.random would compile per shape)."""
  rng = np.random.default_rng(0)
  shapes = {"conv1": (3, 3, 1, 8), "temb": (8,), "conv2": (3, 3, 8, 1)}  # tiny_init(hidden=8)
  params = {k: jnp.asarray(0.3 * rng.standard_normal(v), jnp.float32) for k, v in shapes.items()}
  draws = draws_lib.Draws(t=jnp.asarray([3, 17, 30, 44], jnp.int32),
                          eps=jnp.asarray(_normal(2, 4, *SHAPE)))
  fn = measurements.measurement_fn("loss", tiny_apply, schedules.linear(50), draws)
  return fn, params, jnp.asarray(_normal(1, 10, *SHAPE))


def _rel(a, b):
  return float(jnp.linalg.norm(jnp.asarray(a) - b) / jnp.linalg.norm(b))


# -- bf16 gradients -------------------------------------------------------------------


def test_grad_dtype_is_validated_and_recorded_only_when_set():
  assert proj.ProjectionConfig(dim=8, grad_dtype=jnp.bfloat16).grad_dtype == "bfloat16"
  assert proj.ProjectionConfig(dim=8, grad_dtype="bfloat16") == proj.ProjectionConfig(
      dim=8, grad_dtype=jnp.bfloat16)
  for bad in ("float16", "float32", "nonsense", 3):
    with pytest.raises(ValueError, match="grad_dtype"):
      proj.ProjectionConfig(dim=8, grad_dtype=bad)
  default = proj.ProjectionConfig(dim=8)
  assert fs_lib.projection_spec(default) == {"dim": 8, "kind": "rademacher", "seed": 0,
                                             "block_size": 1024}  # as before the option
  low = fs_lib.projection_spec(proj.ProjectionConfig(dim=8, grad_dtype="bfloat16"))
  assert low == {**fs_lib.projection_spec(default), "grad_dtype": "bfloat16"}
  json.dumps(low)
  config = lambda p: fs_lib.feature_config(  # noqa: E731
      params_hash="h", measurement="loss", num_draws=1, timesteps="uniform", draw_seed=0,
      projection=p, dataset="d", num_examples=3, examples_hash="e")
  with pytest.raises(ValueError, match="projection.grad_dtype"):  # never scored together
    fs_lib.check_compatible(config(default), config(proj.ProjectionConfig(
        dim=8, grad_dtype="bfloat16")))


def test_default_path_is_the_float32_gradient_bit_for_bit(model):
  fn, params, x = model
  config = proj.ProjectionConfig(dim=64, seed=3, nonzeros=4)  # as in the next test
  got = proj.featurize(fn, params, x, config, chunk_size=5)

  @jax.jit
  def reference(params, x):  # the kernel's computation before the option existed
    return proj.project(config, pe.flatten_per_example(jax.vmap(jax.grad(fn), (None, 0))(
        params, x)))

  assert got.dtype == jnp.float32  # chunk by chunk (other shapes may fuse differently)
  np.testing.assert_array_equal(got, jnp.concatenate([reference(params, x[:5]),
                                                      reference(params, x[5:])]))
  assert proj.project_grads_fn(fn, config).__closure__ is not None  # no InDtype wrapper
  assert proj.in_grad_dtype(fn, config) is fn


@pytest.mark.parametrize("kind", ["rademacher", "sparse"])
def test_bf16_gradients_are_close_to_float32_and_far_from_another_model(model, kind):
  fn, params, x = model
  config = proj.ProjectionConfig(dim=64, kind=kind, seed=3, nonzeros=4)
  low_config = proj.ProjectionConfig(dim=64, kind=kind, seed=3, nonzeros=4,
                                     grad_dtype="bfloat16")
  full = proj.featurize(fn, params, x, config, chunk_size=5)
  low = proj.featurize(fn, params, x, low_config, chunk_size=5)
  assert low.dtype == jnp.float32  # projected in the parameters' dtype
  err = _rel(low, full)
  assert 1e-4 < err < BF16_BOUND  # bf16 it is (not float32), and close (measured ≈ 0.005)
  other = _rel(proj.featurize(fn, _jitter(params, 1), x, config, chunk_size=5), full)
  assert other > 10 * BF16_BOUND  # the bound would catch a wrong model (measured ≈ 0.4)


def test_bf16_gradients_run_the_model_in_bf16(model):
  """Every convolution of the forward and backward pass is in bf16, and the gradient
  comes back in float32. (Its values need not be bf16 numbers: XLA may skip a
  rounding where it computes in float32 anyway, ``xla_allow_excess_precision``.)"""
  fn, params, x = model
  low = proj.InDtype(fn, "bfloat16")
  text = str(jax.make_jaxpr(jax.grad(low))(params, x[0]))
  ops = [line for line in text.splitlines() if "conv_general_dilated" in line]
  assert ops and all("bf16[" in line.split("=")[0] for line in ops)
  grads = jax.tree.leaves(jax.jit(jax.grad(low))(params, x[0]))
  assert all(g.dtype == jnp.float32 for g in grads)


def test_bf16_gradients_with_wrt_cast_the_frozen_leaves_too(model):
  fn, params, x = model
  config = proj.ProjectionConfig(dim=32, seed=1, grad_dtype="bfloat16")
  got = proj.featurize(fn, params, x[:4], config, chunk_size=2, wrt="conv")

  @jax.jit
  def reference(params, x):  # every leaf cast to bf16 up front (temb, frozen, too)
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    sub_fn, sub = proj.restrict(fn, low, "conv")
    g = jax.vmap(jax.grad(sub_fn), (None, 0))(sub, x.astype(jnp.bfloat16))
    return proj.project(config, pe.flatten_per_example(g).astype(jnp.float32))

  # (a frozen temb left in float32 would make this model's bf16 conv raise: mixed dtypes)
  want = reference(params, x[:4])  # measured bit-equal; fusion may differ elsewhere
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))
  full = proj.featurize(fn, params, x[:4], proj.ProjectionConfig(dim=32, seed=1),
                        chunk_size=2, wrt="conv")
  assert 1e-4 < _rel(got, full) < BF16_BOUND


# -- bf16 storage -----------------------------------------------------------------------


def test_bf16_store_round_trips_within_the_rounding_bound(tmp_path, x64):
  data = np.random.default_rng(0).standard_normal((10, 6)) * np.logspace(-3, 3, 6)  # float64
  store = FeatureStore.open(tmp_path / "s", {"a": 1}, num_rows=10, dim=6, chunk_rows=4,
                            dtype="bfloat16")
  assert store.dtype == "bfloat16"
  for i in range(store.num_chunks):
    a, b = store.chunk_bounds(i)
    store.write_chunk(i, data[a:b])
  got = FeatureStore.load(tmp_path / "s").read()
  assert got.dtype == np.float32
  rel = np.abs(got - data) / np.abs(data)
  assert rel.max() <= 2.0**-8 and rel.max() > 2.0**-12  # bf16 rounding (float32's is 2⁻²⁴)
  # exactly what numpy's bf16 rounding of the float32 rows gives, upcast
  want = data.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got, gm.as_stored(data.astype(np.float32)))
  # half the bytes of float32 on disk (raw little-endian chunks)
  assert store.chunk_file(0).stat().st_size == 4 * 6 * 2
  # the checksum is that of the stored values (any reread verifies against it)
  digest = store._sidecar["chunk_sha256"]["0"]
  assert digest == fs_lib._rows_sha256(want[:4])
  assert digest != fs_lib._rows_sha256(data[:4].astype(np.float32))
  with pytest.raises(ValueError, match="dtype: stored 'bfloat16', given 'float32'"):
    FeatureStore.open(tmp_path / "s", {"a": 1}, num_rows=10, dim=6, chunk_rows=4)
  with pytest.raises(ValueError, match="dtype must be one of"):
    FeatureStore.open(tmp_path / "t", {"a": 1}, num_rows=10, dim=6, chunk_rows=4,
                      dtype="float16")
  reopened = FeatureStore.open(tmp_path / "s", {"a": 1}, num_rows=10, dim=6, chunk_rows=4,
                               dtype="bfloat16")
  assert reopened.complete and reopened.dtype == "bfloat16"


def test_bf16_store_refuses_values_that_round_to_inf(tmp_path):
  store = FeatureStore.open(tmp_path / "s", {}, num_rows=2, dim=2, chunk_rows=2,
                            dtype="bfloat16")
  big = np.float32(3.4e38)  # finite in float32, inf in bf16
  with pytest.raises(ValueError, match="non-finite"):
    store.write_chunk(0, np.array([[1.0, big], [0.0, 1.0]], np.float32))


def test_float32_store_is_unchanged(tmp_path, x64):
  data = np.random.default_rng(1).standard_normal((5, 3))
  store = FeatureStore.open(tmp_path / "s", {"a": 1}, num_rows=5, dim=3, chunk_rows=5)
  store.write_chunk(0, data)
  assert store.dtype == "float32"
  with open(tmp_path / "s" / fs_lib.SIDECAR) as f:
    assert json.load(f)["dtype"] == "float32"
  np.testing.assert_array_equal(store.read(), data.astype(np.float32))
  assert store.chunk_file(0).stat().st_size == 5 * 3 * 4
  with pytest.raises(ValueError, match="dtype: stored 'float32', given 'bfloat16'"):
    FeatureStore.open(tmp_path / "s", {"a": 1}, num_rows=5, dim=3, chunk_rows=5,
                      dtype="bfloat16")


def test_store_featurize_with_both_options_and_no_mixing(model, tmp_path):
  """bf16 gradients into a bf16 store: the rows are featurize's rounded to bf16; a
  store made for float32 gradients refuses them (and the reverse)."""
  fn, params, x = model
  low = proj.ProjectionConfig(dim=64, seed=3, nonzeros=4, grad_dtype="bfloat16")
  full = proj.ProjectionConfig(dim=64, seed=3, nonzeros=4)  # compiled by the tests above

  def config(p):
    return fs_lib.feature_config(
        params_hash=hashing.model_hash(params), measurement="loss", num_draws=4,
        timesteps="uniform", draw_seed=1, projection=p, dataset="toy", num_examples=10,
        examples_hash=hashing.array_hash(np.arange(10)))

  store = FeatureStore.open(tmp_path / "low", config(low), 10, 64, 5, dtype="bfloat16")
  stores.store_featurize(fn, params, x, low, store, chunk_size=5)
  want = gm.as_stored(proj.featurize(fn, params, x, low, chunk_size=5))
  np.testing.assert_array_equal(FeatureStore.load(tmp_path / "low").read(), want)
  with pytest.raises(ValueError, match="grad_dtype"):
    stores.store_featurize(fn, params, x, full, store, chunk_size=5)
  other = FeatureStore.open(tmp_path / "full", config(full), 10, 64, 5)
  with pytest.raises(ValueError, match="grad_dtype"):
    stores.store_featurize(fn, params, x, low, other, chunk_size=5)
  with pytest.raises(ValueError, match="projection.grad_dtype"):
    FeatureStore.open(tmp_path / "low", config(full), 10, 64, 5, dtype="bfloat16")


def test_run_sidecar_schema_accepts_the_bf16_options():
  sidecar = {"format": fs_lib.FORMAT, "version": fs_lib.VERSION, "num_rows": 2, "dim": 4,
             "chunk_rows": 2, "dtype": "bfloat16", "complete_chunks": [],
             "config": {"model": {"params_sha256": "h"},
                        "measurement": {"name": "loss", "kwargs": {}},
                        "draws": {"num_draws": 1, "timesteps": "uniform", "seed": 0},
                        "projection": {"dim": 4, "kind": "rademacher", "seed": 0,
                                       "block_size": 8, "grad_dtype": "bfloat16"},
                        "dataset": {"name": "d", "num": 2, "examples_sha256": "e"}}}
  from jattr.io import guard
  guard.from_dict(run_features.StoreSidecar, sidecar)
  for key, value in (("dtype", "float16"), ("grad_dtype", "float16")):
    bad = json.loads(json.dumps(sidecar))
    (bad if key == "dtype" else bad["config"]["projection"])[key] = value
    with pytest.raises(guard.ConfigError, match=key):
      guard.from_dict(run_features.StoreSidecar, bad)
  spec = run_features._spec_from_store(sidecar["config"])
  assert spec["grad_dtype"] == "bfloat16"  # --like repeats it
  assert run_features.resolve_spec({})["grad_dtype"] is None
