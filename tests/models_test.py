"""Tests of jattr.models: the UNet and the bridge to a pure apply_fn."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattr import models

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md"

# Small enough to compile in a second or two, but with every kind of block: two
# levels, a channel change (1x1 skip), attention with two heads.
TINY_8 = models.UNetConfig(image_shape=(8, 8, 1), base_channels=8, channel_mults=(1, 2),
                           attn_resolutions=(4,), num_groups=4, num_heads=2)


def _inputs(config, batch, seed=1, dtype=jnp.float32):
  kx, kt = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (batch, *config.image_shape), dtype)
  t = jax.random.randint(kt, (batch,), 0, 1000)
  return x, t


@pytest.mark.parametrize("config", [
    models.digits_config(),
    models.UNetConfig(image_shape=(28, 28, 1), base_channels=8, channel_mults=(1, 2, 2),
                      attn_resolutions=(7,), num_groups=4),
    models.UNetConfig(image_shape=(32, 32, 3), base_channels=8, channel_mults=(1, 2),
                      attn_resolutions=(16,), num_groups=4, num_heads=2),
], ids=["digits_8x8x1", "tiny_28x28x1", "tiny_32x32x3"])
def test_output_shape_and_dtype(config):
  apply_fn, params = models.split_model(models.make_model(config, jax.random.key(0)))
  x, t = _inputs(config, 2)
  out = jax.jit(apply_fn)(params, x, t)
  assert out.shape == (2, *config.image_shape)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_shape=(28, 28, 1), channel_mults=(1, 2, 2, 2)), r"\(28, 28, 1\).*\(1, 2, 2, 2\)"),
    (dict(image_shape=(8, 8, 1), num_groups=5), "num_groups=5"),
    (dict(image_shape=(8, 8, 1), attn_resolutions=(2,)), "attn_resolutions entry 2"),
    (dict(image_shape=(8, 8, 1), attn_resolutions=(4,), num_heads=3), "num_heads=3"),
    (dict(image_shape=(8, 8)), "image_shape"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.UNetConfig(**kwargs)


def test_config_by_name():
  assert models.config_by_name("digits") == models.digits_config()
  assert models.config_by_name("cifar").image_shape == (32, 32, 3)
  with pytest.raises(ValueError, match="'imagenet'"):
    models.config_by_name("imagenet")


# One jitted function for every module call, so that modules with the same graph
# share a compilation.
_call = nnx.jit(lambda model, x, t: model(x, t))


def test_split_merge_round_trip():
  model = models.make_model(TINY_8, jax.random.key(0))
  apply_fn, params = models.split_model(model)
  x, t = _inputs(TINY_8, 3)
  expected = _call(model, x, t)
  np.testing.assert_array_equal(jax.jit(apply_fn)(params, x, t), expected)
  np.testing.assert_array_equal(_call(models.merge_model(TINY_8, params), x, t), expected)
  np.testing.assert_array_equal(jax.jit(models.make_apply_fn(TINY_8))(params, x, t), expected)


def test_params_are_plain_dicts_with_string_keys():
  _, params = models.split_model(models.make_model(TINY_8, jax.random.key(0)))

  def check(tree):
    assert type(tree) is dict
    for k, v in tree.items():
      assert isinstance(k, str)
      if not isinstance(v, jax.Array):
        check(v)

  check(params)


def test_init_fn_matches_split_model_and_is_deterministic():
  init = models.make_init_fn(TINY_8)
  key = jax.random.key(42)
  _, from_model = models.split_model(models.make_model(TINY_8, key))
  from_init = jax.jit(init)(key)
  assert jax.tree.structure(from_init) == jax.tree.structure(from_model)
  jax.tree.map(np.testing.assert_array_equal, from_init, from_model)
  jax.tree.map(np.testing.assert_array_equal, jax.jit(init)(key), from_init)
  # Same distributions as flax's own initialisers: LeCun-normal kernels, zero biases.
  kernel = from_init["up"]["0"]["blocks"]["0"]["conv1"]["kernel"]  # fan_in = 3*3*32
  assert abs(float(jnp.std(kernel)) * np.sqrt(3 * 3 * 32) - 1.0) < 0.1
  assert not np.any(from_init["conv_in"]["bias"])
  other = init(jax.random.key(43))
  assert not np.array_equal(other["conv_in"]["kernel"], from_init["conv_in"]["kernel"])


def test_vmap_over_init_and_apply():
  init, apply_fn = models.make_init_fn(TINY_8), models.make_apply_fn(TINY_8)
  keys = jax.random.split(jax.random.key(0), 3)
  stacked = jax.jit(jax.vmap(init))(keys)
  assert stacked["conv_in"]["kernel"].shape == (3, 3, 3, 1, 8)
  x, t = _inputs(TINY_8, 4)
  batched = jax.jit(jax.vmap(apply_fn, in_axes=(0, None, None)))(stacked, x, t)
  single = jax.jit(apply_fn)
  for m in range(3):
    params_m = jax.tree.map(lambda a: a[m], stacked)
    jax.tree.map(np.testing.assert_array_equal, params_m, init(keys[m]))
    np.testing.assert_allclose(batched[m], single(params_m, x, t), rtol=1e-5, atol=1e-6)


def test_examples_are_independent():
  apply_fn = jax.jit(models.make_apply_fn(TINY_8))
  params = models.make_init_fn(TINY_8)(jax.random.key(0))
  x, t = _inputs(TINY_8, 5)
  j = 2
  x2 = x.at[j].set(10.0 * jax.random.normal(jax.random.key(7), x.shape[1:]))
  t2 = t.at[j].set(999 - t[j])
  out, out2 = apply_fn(params, x, t), apply_fn(params, x2, t2)
  others = np.arange(5) != j
  np.testing.assert_allclose(out2[others], out[others], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out2[j], out[j])


def test_jit_grad_reaches_every_parameter():
  apply_fn = models.make_apply_fn(TINY_8)
  params = models.make_init_fn(TINY_8)(jax.random.key(0))
  x, t = _inputs(TINY_8, 2)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(apply_fn(p, x, t) - x))))(params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  # Nothing is zero-initialised, so no parameter has an identically zero gradient at
  # initialisation (attribution tests on untrained models rely on this).
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), jax.tree_util.keystr(path)


def test_float64_params(x64):
  apply_fn = models.make_apply_fn(TINY_8)
  params32 = models.make_init_fn(TINY_8)(jax.random.key(0))
  params64 = jax.tree.map(lambda a: a.astype(jnp.float64), params32)
  x, t = _inputs(TINY_8, 2, dtype=jnp.float64)
  apply_fn = jax.jit(apply_fn)
  out64 = apply_fn(params64, x, t)
  assert out64.dtype == jnp.float64
  out32 = apply_fn(params32, x.astype(jnp.float32), t)
  assert out32.dtype == jnp.float32
  np.testing.assert_allclose(out64, out32, rtol=1e-4, atol=1e-4)


def test_bad_params_and_inputs_are_rejected():
  apply_fn = models.make_apply_fn(TINY_8)
  params = models.make_init_fn(TINY_8)(jax.random.key(0))
  x, t = _inputs(TINY_8, 2)
  wrong = dict(params, conv_in={"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.zeros(4)})
  with pytest.raises(ValueError, match="conv_in/"):
    apply_fn(wrong, x, t)
  with pytest.raises(ValueError, match="missing.*conv_out"):
    apply_fn({k: v for k, v in params.items() if k != "conv_out"}, x, t)
  with pytest.raises(ValueError, match=r"x must have shape \[B, 8, 8, 1\]"):
    apply_fn(params, jnp.zeros((2, 8, 8, 3)), t)
  with pytest.raises(ValueError, match="t must have shape"):
    apply_fn(params, x, t[:1])


def test_split_model_rejects_non_param_state():

  class WithBatchNorm(nnx.Module):

    def __init__(self):
      self.bn = nnx.BatchNorm(1, rngs=nnx.Rngs(0))

    def __call__(self, x, t):
      return self.bn(x)

  with pytest.raises(ValueError, match="only nnx.Param"):
    models.split_model(WithBatchNorm())


def _count(config):
  return models.num_params(jax.eval_shape(models.make_init_fn(config), jax.random.key(0)))


def test_parameter_counts_match_docs():
  docs = DOCS.read_text()
  for name in ("digits", "fashion_mnist", "cifar", "cifar_30m"):
    n = _count(models.config_by_name(name))
    assert re.search(rf"`{name}`.*\| {n:,} \|", docs), f"docs/models.md lacks {name}: {n:,}"
  assert 25e6 <= _count(models.cifar_30m_config()) <= 35e6


def test_conv_impls_agree_and_share_parameters():
  """im2col and xla convolutions give the same network output for the same params."""
  import dataclasses

  from jattr.models import make_apply_fn, make_init_fn
  cfg = dataclasses.replace(TINY_8, conv_impl="xla")
  params = make_init_fn(cfg)(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, *cfg.image_shape))
  t = jnp.array([3, 700])
  a = jax.jit(make_apply_fn(cfg))(params, x, t)
  b = jax.jit(make_apply_fn(dataclasses.replace(cfg, conv_impl="im2col")))(params, x, t)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="conv_impl"):
    dataclasses.replace(cfg, conv_impl="fft")
