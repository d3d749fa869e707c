"""Harness featurisers: the dense projection restricted to kernels, the structured one."""

import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jattr import models
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import measurements
from jattr.diffusion import schedules
from jattr.bench import gradient_methods as gm
from jattr.features import projection as proj
from jattr.grads import per_example as pe

MODEL = {"base_channels": 4, "channel_mults": (1, 2), "num_res_blocks": 1,
         "attn_resolutions": (), "num_groups": 2, "time_embed_dim": 8, "conv_impl": "xla"}


def _cache():
  """The fields of an ``LdsCache`` the featurisers read, for a tiny UNet."""
  config = models.UNetConfig(image_shape=(4, 4, 1), **MODEL)
  params = models.make_init_fn(config)(jax.random.key(0))
  # Non-zero biases and norms: dropping them instead of holding them fixed would show.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: a + 0.1 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                        params)
  images = np.random.default_rng(1).standard_normal((3, 4, 4, 1)).astype(np.float32)
  return types.SimpleNamespace(
      spec=types.SimpleNamespace(model=dict(MODEL)), train_images=images,
      schedule=schedules.linear(50), train_config=types.SimpleNamespace(parameterization="eps"),
      full_params=params, apply_fn=models.make_apply_fn(config))


def test_dense_kernels_only_projects_the_kernel_gradients():
  cache = _cache()
  options = dict(measurement="loss", num_draws=2, draw_seed=1, dim=16, projection_seed=3)
  got = gm.feature_fn(cache, covered="kernels", **options)(cache.train_images)

  draws = draws_lib.fixed_draws(jax.random.key(1), 2, (4, 4, 1), 50)
  fn = measurements.measurement_fn("loss", cache.apply_fn, cache.schedule, draws)

  @jax.jit
  def reference(params, images):
    flat = traverse_util.flatten_dict(pe.per_example_grads(fn, params, images))
    kernels = traverse_util.unflatten_dict({p: g for p, g in flat.items() if p[-1] == "kernel"})
    return proj.project(proj.ProjectionConfig(dim=16, seed=3), pe.flatten_per_example(kernels))

  want = reference(cache.full_params, jnp.asarray(cache.train_images))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * float(jnp.max(jnp.abs(want))))


def test_structured_features_cover_every_layer():
  cache = _cache()
  features = gm.structured_feature_fn(cache, num_draws=2, dim_in=5, dim_out=3)
  num_kernels = sum(p[-1] == "kernel" for p in traverse_util.flatten_dict(cache.full_params))
  shape = jax.eval_shape(features, cache.train_images).shape
  assert shape == (3, num_kernels * 5 * 3)
