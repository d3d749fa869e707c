"""The layer registry on models of several frameworks, and K-FAC built on it, in float64.

For every framework: each weight matrix and conv kernel is found (named by its path),
Σ_r a_rᵀ δ_r over the recorded inputs and output cotangents equals the weight's
gradient, biases are paired with their layers, and a one-example-draw K-FAC equals
the dense GGN's within-layer blocks (exact there: A ⊗ G = a aᵀ ⊗ Σ_u δ_u δ_uᵀ).
"""

import dataclasses
import functools

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import layer_registry as lr
from jattr import models
from jattr.curvature import dense, kfac
from jattr.wrt import restrict

from kfac_test import EXACT, block_errors, dense_kfac, problem


def _f64(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float64) if eqx.is_array(x) else x, tree)


def check_rows(fn, params, *args):
  """Every site's Σ_r a_rᵀ δ_r (and Σ_r δ_r for its bias) against jax.grad; returns it."""
  reg = lr.find_layers(fn, params, *args)
  run = jax.jit(lr.instrument(reg))
  zs = lr.zero_perturbations(reg)
  out, inputs = run(params, zs, *args)
  np.testing.assert_allclose(out, jax.jit(fn)(params, *args), rtol=1e-12, atol=1e-12)
  u = jax.random.normal(jax.random.PRNGKey(1), out.shape, out.dtype)
  grads = jax.tree.leaves(jax.jit(jax.grad(lambda p: jnp.vdot(u, fn(p, *args))))(params))
  deltas = jax.jit(jax.grad(lambda z: jnp.vdot(u, run(params, z, *args)[0])))(zs)
  for site, x, d in zip(reg.sites, inputs, deltas):
    a, g = lr.input_rows(site, x), lr.output_rows(site, d)
    np.testing.assert_allclose(a.T @ g, lr.to_matrix(grads[site.weight], site.weight_ops),
                               rtol=1e-10, atol=1e-12, err_msg=reg.paths[site.weight])
    if site.bias is not None:
      np.testing.assert_allclose(g.sum(0), grads[site.bias].reshape(-1), rtol=1e-10,
                                 atol=1e-12)
  return reg


def weights_and_biases(reg):
  return ({reg.paths[s.weight] for s in reg.sites},
          {reg.paths[s.bias] for s in reg.sites if s.bias is not None})


def test_plain_jax_mlp(x64):
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  params = {"l1": {"w": jax.random.normal(k[0], (3, 5)), "b": jnp.ones(5)},
            "l2": {"w": jax.random.normal(k[1], (4, 5)), "b": jnp.ones(4)},
            "gain": jnp.ones(4)}

  def mlp(p, x):  # l2 stored [out, in], as torch does
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    return (h @ p["l2"]["w"].T + p["l2"]["b"]) * p["gain"]

  reg = check_rows(mlp, params, jnp.ones((2, 3)))
  assert weights_and_biases(reg) == ({"l1/w", "l2/w"}, {"l1/b", "l2/b"})
  assert reg.unmatched == {0: "used by mul"}
  assert lr.describe_unmatched(reg) == []  # only weight matrices are reported


def test_equinox_mlp_and_conv_under_vmap(x64):
  mlp = _f64(eqx.nn.MLP(4, 3, 6, 2, key=jax.random.PRNGKey(0)))
  params, static = eqx.partition(mlp, eqx.is_array)
  reg = check_rows(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params, jnp.ones((2, 4)))
  assert weights_and_biases(reg) == ({f"layers/{i}/weight" for i in range(3)},
                                     {f"layers/{i}/bias" for i in range(3)})
  conv = _f64(eqx.nn.Conv2d(2, 3, 3, padding=1, key=jax.random.PRNGKey(1)))  # OIHW, bias [3,1,1]
  params, static = eqx.partition(conv, eqx.is_array)
  reg = check_rows(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params,
                   jax.random.normal(jax.random.PRNGKey(2), (2, 2, 5, 5)))
  assert weights_and_biases(reg) == ({"weight"}, {"bias"}) and not reg.unmatched


class LinenCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.LayerNorm()(x)
    x = nn.Conv(3, (3, 3), strides=2)(x)
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_linen_cnn(x64):
  model = LinenCNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 6, 2))
  params = _f64(model.init(jax.random.PRNGKey(1), x))
  reg = check_rows(model.apply, params, x)
  assert weights_and_biases(reg)[0] == {"params/Conv_0/kernel", "params/Conv_1/kernel",
                                        "params/Dense_0/kernel"}
  assert sorted(reg.paths[i] for i in reg.unmatched) == ["params/LayerNorm_0/bias",
                                                         "params/LayerNorm_0/scale"]


# The UNet compiles slowly (im2col most): both are slow cases. Their default-run
# stand-ins are the linen and equinox convs above and test_im2col_conv below; the
# UNet's K-FAC runs in the default suite through tests/curvature_cli_test.py.
@pytest.mark.slow
@pytest.mark.parametrize("conv_impl", ["im2col", "xla"])
def test_jattr_unet_either_convolution(x64, conv_impl):
  # im2col convs are patches @ kernel.reshape(d_in, d_out): a dense site whose weight
  # is a reshape view of the kernel, with the same matrix layout as the native conv.
  config = models.digits_config()
  params = _f64(models.make_init_fn(config)(jax.random.PRNGKey(0)))
  apply_fn = models.make_apply_fn(dataclasses.replace(config, conv_impl=conv_impl))
  reg = check_rows(apply_fn, params, jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 1)),
                   jnp.array([10]))
  kernels = {p for p, s in zip(reg.paths, reg.shapes) if len(s) >= 2}
  assert weights_and_biases(reg)[0] == kernels and len(kernels) == 32
  assert all("norm" in reg.paths[i] for i in reg.unmatched)


def test_im2col_conv(x64):
  # A conv written as patches @ kernel.reshape(d_in, d_out) (jattr's UNet on CPU): a
  # dense site on a reshape view of the HWIO kernel, in the native conv's layout.
  def im2col(p, x):
    patches = jax.lax.conv_general_dilated_patches(
        x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "OIHW", "NHWC"))
    b, h, w, f = patches.shape  # features ordered (c_in, kh, kw)
    patches = patches.reshape(b, h, w, 2, 3, 3).transpose(0, 1, 2, 4, 5, 3).reshape(b, h, w, f)
    return patches @ p["kernel"].reshape(f, -1) + p["bias"]

  params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 4)), "bias": jnp.ones(4)}
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 5, 2))
  reg = check_rows(im2col, params, x)
  [site] = reg.sites
  assert (site.kind, site.d_in, site.d_out, site.weight_ops) == ("dense", 18, 4,
                                                                 (("reshape", (18, 4)),))
  native = lr.find_layers(
      lambda p, x: jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")),
      params, x)
  assert native.sites[0].weight_ops == site.weight_ops


def test_unmatched_weights_are_named_with_the_reason(x64):
  def model(p, x):
    h = x @ p["shared"]
    h = h * p["gate"]  # a weight matrix used elementwise
    return jax.lax.scan(lambda c, _: (c @ p["rec"], None), h, None, length=2)[0]

  params = {"shared": jnp.ones((3, 3)), "gate": jnp.ones((2, 3)), "rec": jnp.eye(3)}
  reg = lr.find_layers(model, params, jnp.ones((2, 3)))
  msgs = lr.describe_unmatched(reg)
  assert any(m.startswith("gate [2, 3]: used by mul") for m in msgs)
  assert any(m.startswith("rec [3, 3]: used by scan") for m in msgs)
  assert weights_and_biases(reg)[0] == {"shared"}


# --- K-FAC on the registry: one example-draw is exact, for every framework ---------

def as_denoiser(model_fn):
  """``apply_fn(params, x_t [B,2,2,1], t)`` from a model of [B, 5] -> [B, 4] features."""
  def apply_fn(p, x, t):
    b = x.shape[0]
    h = jnp.concatenate([x.reshape(b, -1), t[:, None].astype(x.dtype) / 50], axis=1)
    return model_fn(p, h).reshape(x.shape)
  return apply_fn


class LinenConvNet(nn.Module):
  """A 2x2 VALID conv over a 2x2 image (one output position), then a dense layer."""

  @nn.compact
  def __call__(self, h):
    x = h[:, :4].reshape(-1, 2, 2, 1)
    x = jnp.concatenate([x, jnp.broadcast_to(h[:, 4:, None, None], x.shape)], axis=-1)
    x = jnp.tanh(nn.Conv(3, (2, 2), padding="VALID")(x))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def framework_models():
  mlp = eqx.nn.MLP(5, 4, 3, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
  eqx_params, eqx_static = eqx.partition(mlp, eqx.is_array)
  linen = LinenConvNet()
  linen_params = linen.init(jax.random.PRNGKey(1), jnp.ones((1, 5)))
  k = jax.random.split(jax.random.PRNGKey(2), 2)
  plain_params = {"w1": jax.random.normal(k[0], (5, 3)), "b1": jnp.zeros(3),
                  "w2": jax.random.normal(k[1], (3, 4)) / 2}
  plain = lambda p, h: jnp.tanh(h @ p["w1"] + p["b1"]) @ p["w2"]  # noqa: E731
  return {
      "equinox": (lambda p, h: jax.vmap(eqx.combine(p, eqx_static))(h), eqx_params, 2),
      "linen": (linen.apply, linen_params, 2),
      "plain": (plain, plain_params, 2),
  }


@pytest.mark.parametrize("name", ["equinox", "linen", "plain"])
def test_one_example_kfac_equals_the_dense_ggn_blocks(x64, name):
  model_fn, params, n_kron = framework_models()[name]
  params = _f64(params)
  apply_fn = as_denoiser(model_fn)
  schedule, x0, draws, _ = problem(1, 1, (2, 2, 1))
  g = dense.dense_ggn(apply_fn, params, schedule, x0, draws)
  state = kfac.fit_kfac(apply_fn, params, schedule, x0, draws, **EXACT)
  kinds = [lay.kind for lay in state.layout]
  assert kinds.count("kronecker") == n_kron and set(kinds) == {"kronecker"}
  np.testing.assert_allclose(block_errors(g, dense_kfac(state, params), params, state.layout),
                             0.0, atol=1e-10)


def test_lora_blocks_equal_the_dense_ggn_of_the_adapter(x64):
  # K-FAC w.r.t. a LoRA adapter only (the base frozen): blocks for A (inputs a,
  # cotangents c B δ) and B (inputs c Aᵀ a, cotangents δ), exact for one example-draw.
  model_fn, base, _ = framework_models()["plain"]
  apply_fn = as_denoiser(model_fn)
  lora_apply, params = models.lora_model(apply_fn, _f64(base), jax.random.PRNGKey(4), 2)
  params = _f64(params)
  params["lora"] = jax.tree.map(lambda x: x + 0.3, params["lora"])  # B ≠ 0
  schedule, x0, draws, _ = problem(1, 1, (2, 2, 1))
  sub_apply, sub = restrict(lora_apply, params, "^lora")
  g = dense.dense_ggn(sub_apply, sub, schedule, x0, draws)
  state = kfac.fit_kfac(lora_apply, params, schedule, x0, draws, wrt="^lora", **EXACT)
  assert [lay.kind for lay in state.layout] == ["kronecker"] * 4
  assert all(lay.name.startswith("lora/") for lay in state.layout)
  np.testing.assert_allclose(block_errors(g, dense_kfac(state, sub), sub, state.layout), 0.0,
                             atol=1e-10)


def test_weight_used_at_two_layers_gets_one_block(x64):
  # y = [a₁ W, a₂ W] with each output its own loss term: "expand" over both sites'
  # positions is exact for any number of example-draws (Eschenhagen et al. 2023).
  def apply_fn(p, x, t):
    b = x.shape[0]
    a = jnp.concatenate([x.reshape(b, 2, 2), jnp.broadcast_to(t[:, None, None] / 50.0,
                                                             (b, 2, 1))], axis=-1)
    y1 = a[:, 0] @ p["w"] + p["b"]
    y2 = a[:, 1] @ p["w"] + p["b"]
    return jnp.stack([y1, y2], axis=1).reshape(x.shape)

  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (3, 2)), "b": jnp.array([0.1, -0.2])}
  schedule, x0, draws, _ = problem(3, 2, (2, 2, 1))
  state = kfac.fit_kfac(apply_fn, params, schedule, x0, draws, **EXACT)
  assert [(lay.name, lay.kind) for lay in state.layout] == [("w", "kronecker")]
  g = dense.dense_ggn(apply_fn, params, schedule, x0, draws)
  np.testing.assert_allclose(block_errors(g, dense_kfac(state, params), params, state.layout),
                             0.0, atol=1e-10)


@pytest.mark.slow
def test_unet_factors_equal_for_im2col_and_xla_convolutions(x64):
  config = models.digits_config()
  params = _f64(models.make_init_fn(config)(jax.random.PRNGKey(0)))
  schedule, x0, draws, key = problem(2, 1, (8, 8, 1))
  fit = functools.partial(kfac.fit_kfac, params=params, schedule=schedule, x0=x0, draws=draws,
                          key=key)
  states = [fit(models.make_apply_fn(dataclasses.replace(config, conv_impl=impl)))
            for impl in ("im2col", "xla")]
  for (la, ba), (lb, bb) in zip(*[zip(s.layout, s.blocks) for s in states]):
    assert la == lb  # same names, leaves and matrix layouts
    if la.kind == "kronecker":
      np.testing.assert_allclose(ba.a, bb.a, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(ba.g, bb.g, rtol=1e-9, atol=1e-12)
