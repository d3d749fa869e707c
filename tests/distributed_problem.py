"""The problem tests/distributed_test.py computes in one process and in two."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from jattr.curvature import dense, kfac
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import measurements, schedules
from jattr.features.projection import ProjectionConfig, featurize

T = 50
SHAPE = (4, 4, 1)


def mlp_apply(p, x, t):
  b = x.shape[0]
  h = jnp.concatenate([x.reshape(b, -1), t[:, None].astype(x.dtype) / T], axis=1)
  h = jnp.tanh(h @ p["l1"]["w"] + p["l1"]["b"])
  return (h @ p["l2"]["w"] + p["l2"]["b"]).reshape(x.shape)


def compute(mesh) -> dict:
  """Features, the dense GGN and a K-FAC matvec, on ``mesh`` (None: one device), as
  host float64 arrays (the same in every process)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  d = int(np.prod(SHAPE))
  params = {"l1": {"w": jax.random.normal(keys[0], (d + 1, 5)),
                   "b": 0.1 * jax.random.normal(keys[1], (5,))},
            "l2": {"w": jax.random.normal(keys[2], (5, d)) / np.sqrt(5),
                   "b": 0.1 * jax.random.normal(keys[3], (d,))}}
  x0 = np.asarray(jax.random.normal(keys[4], (11,) + SHAPE))
  draws = draws_lib.fixed_draws(keys[5], 3, SHAPE, T, timesteps="random", dtype=jnp.float64)
  schedule = schedules.linear(T)
  fn = measurements.measurement_fn("loss", mlp_apply, schedule, draws)
  pc = ProjectionConfig(dim=8, kind="gaussian", seed=0)
  phi = featurize(fn, params, x0, pc, chunk_size=2, mesh=mesh)
  g = dense.dense_ggn(mlp_apply, params, schedule, x0, draws, batch_size=2, mesh=mesh)
  from jattr import devices  # pylint: disable=import-outside-toplevel
  with devices.use_mesh(mesh):
    state = kfac.fit_kfac(mlp_apply, params, schedule, x0, draws,
                          estimation_mode="ggn_exact", chunk_size=2)
  v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape), params)
  kv = ravel_pytree(kfac.kfac_matvec(state, v))[0]
  return {"features": np.asarray(phi), "ggn": np.asarray(g), "kfac_matvec": np.asarray(kv)}
