"""Conditional models: the class- and context-conditional UNet, classifier-free guidance
in the samplers, and conditional training (condition dropout, train_many)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattr import diffusion, models
from jattr.diffusion import losses
from jattr.features import plain_layer
from jattr.models.bridge import null_condition
from jattr.train import TrainConfig, member_keys, train, train_many
from jattr.train import loop as loop_lib
from toy_models import tiny_apply, tiny_init

# Tiny UNets with every block kind (two levels, attention with two heads at 4x4).
BASE = models.UNetConfig(image_shape=(8, 8, 1), base_channels=8, channel_mults=(1, 2),
                         attn_resolutions=(4,), num_groups=4, num_heads=2, time_embed_dim=16)
CLASS = dataclasses.replace(BASE, num_classes=3)
TEXT = dataclasses.replace(BASE, cond_dim=6)
BOTH = dataclasses.replace(BASE, num_classes=3, cond_dim=6)
SCHED = diffusion.linear(50)

# Parameter counts of the presets before conditioning existed (docs/models.md).
PRESET_PARAMS = {"digits": 185_249, "fashion_mnist": 1_235_745}


def _count(config):
  return models.num_params(jax.eval_shape(models.make_init_fn(config), jax.random.key(0)))


def _inputs(config, batch, seed=1):
  kx, kt = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, (batch, *config.image_shape)),
          jax.random.randint(kt, (batch,), 0, 1000))


def _context(batch, length=4, dim=6, seed=2):
  return jax.random.normal(jax.random.key(seed), (batch, length, dim))


# ----------------------------------------------------------------------------- the UNet


@pytest.mark.parametrize("name", sorted(PRESET_PARAMS))
def test_default_presets_are_unchanged(name):
  config = models.config_by_name(name)
  assert config.num_classes is None and config.cond_dim is None and not config.conditional
  assert _count(config) == PRESET_PARAMS[name]
  params = jax.eval_shape(models.make_init_fn(config), jax.random.key(0))
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = {str(k.key) for path, _ in flat for k in path}
  assert not names & {"class_embed", "cross"}
  # The presets are the same configs with overrides left out.
  assert models.config_by_name(name, num_classes=None) == config


def test_every_preset_takes_the_conditioning_fields():
  for name in ("digits", "fashion_mnist", "cifar", "cifar_30m"):
    config = models.config_by_name(name, num_classes=10, cond_dim=32)
    assert (config.num_classes, config.cond_dim, config.conditional) == (10, 32, True)
  assert models.digits_config(num_classes=10) == models.config_by_name("digits", num_classes=10)
  with pytest.raises(TypeError, match="unknown UNetConfig fields"):
    models.digits_config(num_class=10)


@pytest.mark.parametrize("kwargs,match", [
    ({"num_classes": 0}, "num_classes"),
    ({"num_classes": 2.5}, "num_classes"),
    ({"cond_dim": 0}, "cond_dim"),
    ({"cond_dim": 4, "attn_resolutions": ()}, "attn_resolutions"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(BASE, **kwargs)


def test_conditional_parameters_add_to_the_unconditional_ones():
  base = jax.eval_shape(models.make_init_fn(BASE), jax.random.key(0))
  flat_base = {p: a.shape for p, a in jax.tree_util.tree_flatten_with_path(base)[0]}
  # Attention blocks of BASE: one per level on the down path (2 levels, one at 4x4),
  # the middle one, and num_res_blocks of the up level at 4x4.
  attn_channels = [16, 16, 16]
  temb = BASE.temb_dim
  for config, extra in [
      (CLASS, (3 + 1) * temb),
      (TEXT, sum(2 * c + (c * c + c) + (6 * 2 * c + 2 * c) + (c * c + c)
                 for c in attn_channels)),
  ]:
    params = jax.eval_shape(models.make_init_fn(config), jax.random.key(0))
    flat = {p: a.shape for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert {p: flat[p] for p in flat_base} == flat_base
    assert _count(config) - _count(BASE) == extra
  assert _count(BOTH) - _count(BASE) == (_count(CLASS) - _count(BASE)) + (
      _count(TEXT) - _count(BASE))


def test_class_conditional_output_depends_on_the_label_per_example():
  apply_fn = jax.jit(models.make_apply_fn(CLASS))
  params = models.make_init_fn(CLASS)(jax.random.key(0))
  x, t = _inputs(CLASS, 4)
  labels = jnp.array([0, 1, 2, 3])  # 3 = the null class
  out = apply_fn(params, x, t, labels)
  assert out.shape == x.shape
  j = 1
  out2 = apply_fn(params, x, t, labels.at[j].set(2))
  others = np.arange(4) != j
  np.testing.assert_allclose(out2[others], out[others], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out2[j], out[j], atol=1e-4)
  # Examples with the same image and timestep differ only through their labels.
  xs, ts = jnp.broadcast_to(x[:1], x.shape), jnp.broadcast_to(t[:1], t.shape)
  out = np.asarray(apply_fn(params, xs, ts, labels))
  assert all(not np.allclose(out[a], out[b], atol=1e-4) for a in range(4) for b in range(a))


def test_cross_attention_output_depends_on_the_context_per_example():
  apply_fn = jax.jit(models.make_apply_fn(TEXT))
  params = models.make_init_fn(TEXT)(jax.random.key(0))
  x, t = _inputs(TEXT, 3)
  ctx = _context(3)
  out = apply_fn(params, x, t, ctx)
  j = 2
  out2 = apply_fn(params, x, t, ctx.at[j].set(3.0 * _context(1, seed=9)[0]))
  np.testing.assert_allclose(out2[:j], out[:j], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out2[j], out[j], atol=1e-4)
  # The zero (null) context gives the same output for every sequence length.
  null1 = apply_fn(params, x, t, null_condition(TEXT, 3))
  null5 = apply_fn(params, x, t, null_condition(TEXT, 3, context_length=5))
  np.testing.assert_allclose(null1, null5, rtol=1e-5, atol=1e-6)


def test_label_and_context_together():
  apply_fn = jax.jit(models.make_apply_fn(BOTH))
  params = models.make_init_fn(BOTH)(jax.random.key(0))
  x, t = _inputs(BOTH, 2)
  cond = {"label": jnp.array([0, 1]), "context": _context(2)}
  out = apply_fn(params, x, t, cond)
  assert not np.allclose(apply_fn(params, x, t, {**cond, "label": jnp.array([2, 1])})[0],
                         out[0], atol=1e-4)
  assert not np.allclose(apply_fn(params, x, t, {**cond, "context": 2 * cond["context"]})[0],
                         out[0], atol=1e-4)
  null = null_condition(BOTH, 2)
  assert set(null) == {"label", "context"}
  np.testing.assert_array_equal(null["label"], [3, 3])
  assert null["context"].shape == (2, 1, 6)


def test_bad_conditions_are_rejected():
  x, t = _inputs(BASE, 2)
  # Abstract modules: the condition is checked before any parameter is used.
  unets = {c: nnx.eval_shape(lambda c=c: models.UNet(c, rngs=nnx.Rngs(0)))
           for c in (BASE, CLASS, TEXT, BOTH)}
  for config, cond, match in [
      (BASE, jnp.array([0, 1]), "unconditional"),
      (CLASS, None, "needs cond"),
      (CLASS, jnp.array([0, 1, 2]), "labels"),
      (CLASS, jnp.array([0.0, 1.0]), "labels"),
      (TEXT, jnp.zeros((2, 4, 5)), "context"),
      (TEXT, jnp.zeros((2, 6)), "context"),
      (BOTH, jnp.array([0, 1]), "dict"),
  ]:
    with pytest.raises(ValueError, match=match):
      unets[config](x, t, cond)
  with pytest.raises(ValueError, match="conditional config"):
    null_condition(BASE, 2)


def test_null_condition_shapes():
  np.testing.assert_array_equal(null_condition(CLASS, 3), [3, 3, 3])
  assert null_condition(CLASS, 3).dtype == jnp.int32
  assert null_condition(CLASS, None).shape == ()
  assert null_condition(TEXT, None).shape == (1, 6)
  assert null_condition(TEXT, 2, context_length=4).shape == (2, 4, 6)
  assert not np.any(null_condition(TEXT, 2))


def test_every_builder_takes_the_condition():
  params = models.make_init_fn(BOTH)(jax.random.key(0))
  x, t = _inputs(BOTH, 2)
  cond = {"label": jnp.array([0, 2]), "context": _context(2)}
  ref = models.make_apply_fn(BOTH)(params, x, t, cond)
  model = models.merge_model(BOTH, params)
  split_apply, split_params = models.split_model(model)
  np.testing.assert_allclose(split_apply(split_params, x, t, cond), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(models.kfac_apply_fn(BOTH)(params, x, t, cond), ref,
                             rtol=1e-4, atol=1e-5)
  # The layered form computes the same function, the cross-attention layers routed
  # like the others.
  seen = []

  def spy(name, x, w, spec):
    seen.append(name)
    return plain_layer(name, x, w, spec)

  layered = models.make_layered_apply_fn(BOTH)
  np.testing.assert_allclose(layered(params, x, t, cond, layer=spy), ref, rtol=1e-4, atol=1e-5)
  assert "mid_attn/cross/kv" in seen and "mid_attn/cross/q" in seen


def test_per_example_gradients_with_labels():
  apply_fn = models.make_apply_fn(CLASS)
  params = models.make_init_fn(CLASS)(jax.random.key(0))
  x0, t = _inputs(CLASS, 4)
  x0 = jnp.tanh(x0)
  eps = jax.random.normal(jax.random.key(5), x0.shape)
  labels = jnp.array([0, 2, 3, 2])
  grad = jax.grad(losses.example_loss, argnums=1)
  per_example = jax.jit(lambda p, x, c, t, e: jax.vmap(
      lambda x, c, t, e: grad(apply_fn, p, SCHED, (x, c), t, e))(x, c, t, e))
  batched = per_example(params, x0, labels, t % 50, eps)
  # Example i's gradient reaches only its own label's row of the table, and is
  # example i's alone: examples 1 and 3 share a label, not a gradient.
  table = np.asarray(batched["class_embed"]["embedding"])
  for i, label in enumerate(labels):
    np.testing.assert_array_equal(np.flatnonzero(np.any(table[i] != 0, axis=1)), [int(label)])
  assert not np.allclose(table[1], table[3])
  moved = per_example(params, x0.at[3].set(-x0[3]), labels, t % 50, eps)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[:3], b[:3]), batched, moved)


# ------------------------------------------------------------ classifier-free guidance


def _label_model():
  """A tiny class-conditional UNet and its params (random init)."""
  return jax.jit(models.make_apply_fn(CLASS)), models.make_init_fn(CLASS)(jax.random.key(0))


# DDPM shares the guided model call with DDIM (_guided); its run is the slow twin.
@pytest.mark.parametrize("sampler", ["ddim", pytest.param("ddpm", marks=pytest.mark.slow)])
def test_guidance_scale_one_is_conditional_sampling(sampler):
  apply_fn, params = _label_model()
  sched = diffusion.linear(10)
  labels, null = jnp.array([0, 1, 2]), null_condition(CLASS, 3)
  run = (functools.partial(diffusion.ddim_sample, num_steps=4) if sampler == "ddim"
         else diffusion.ddpm_sample)
  key, shape = jax.random.key(4), (3, 8, 8, 1)
  plain = run(apply_fn, params, sched, key, shape, cond=labels)
  guided = run(apply_fn, params, sched, key, shape, cond=labels, guidance_scale=1.0,
               null_cond=null)
  np.testing.assert_array_equal(guided, plain)


def test_guidance_scale_zero_is_null_sampling_and_labels_matter():
  apply_fn, params = _label_model()
  null = null_condition(CLASS, 3)
  # One program for every label and (traced) scale: always the two-call guided form.
  guided = jax.jit(lambda labels, s: diffusion.ddim_sample(
      apply_fn, params, SCHED, jax.random.key(4), (3, 8, 8, 1), 8, cond=labels,
      guidance_scale=s, null_cond=null))
  labels = jnp.array([0, 1, 2])
  plain_null = diffusion.ddim_sample(apply_fn, params, SCHED, jax.random.key(4), (3, 8, 8, 1),
                                     8, cond=null)
  np.testing.assert_allclose(guided(labels, 0.0), plain_null, rtol=1e-5, atol=1e-5)
  a, b = guided(labels, 3.0), guided(jnp.array([1, 1, 2]), 3.0)
  assert not np.allclose(a[0], b[0], atol=1e-3)
  np.testing.assert_allclose(a[1:], b[1:], rtol=1e-5, atol=1e-5)  # per-sample conditions
  assert not np.allclose(a, guided(labels, 1.0), atol=1e-3)  # the scale matters


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_guidance_combines_the_raw_outputs(parameterization):
  """A model whose output is its (float) condition: guidance at scale s must equal the
  model called with the condition o_null + s (o_cond − o_null)."""
  def apply_fn(params, x, t, c):
    del params, t
    return jnp.broadcast_to(c[:, None, None, None], x.shape) + 0.1 * x

  c, n, s = jnp.array([0.5, -0.2]), jnp.array([0.1, 0.3]), 2.5
  run = functools.partial(diffusion.ddim_sample, apply_fn, None, SCHED, jax.random.key(0),
                          (2, 2, 2, 1), 5, eta=0.5, parameterization=parameterization,
                          clip_x0=False)
  np.testing.assert_allclose(run(cond=c, guidance_scale=s, null_cond=n),
                             run(cond=n + s * (c - n)), rtol=1e-5, atol=1e-5)


def test_the_condition_does_not_change_the_noise():
  """A model that ignores its condition samples the same under any condition and scale,
  and the same as its unconditional form: keys and noise are the condition's own."""
  def cond_apply(params, x, t, c):
    del c
    return tiny_apply(params, x, t)

  run = functools.partial(diffusion.ddim_sample, params=tiny_init(jax.random.key(0)),
                          schedule=SCHED, key=jax.random.key(1), shape=(2, 4, 4, 1),
                          num_steps=10, eta=1.0)
  ref = run(tiny_apply)
  np.testing.assert_array_equal(run(cond_apply, cond=jnp.array([0, 1])), ref)
  np.testing.assert_allclose(run(cond_apply, cond=jnp.array([0, 1]), guidance_scale=4.0,
                                 null_cond=jnp.array([2, 2])), ref, rtol=1e-5, atol=1e-6)


def test_guidance_argument_errors():
  apply_fn, params = _label_model()
  run = functools.partial(diffusion.ddim_sample, apply_fn, params, SCHED, jax.random.key(0),
                          (2, 8, 8, 1), 2)
  with pytest.raises(ValueError, match="needs null_cond"):
    run(cond=jnp.array([0, 1]), guidance_scale=2.0)
  with pytest.raises(ValueError, match="needs a condition"):
    run(null_cond=null_condition(CLASS, 2), guidance_scale=2.0)
  with pytest.raises(ValueError, match="leading axis"):
    run(cond=jnp.array([0, 1, 2]))
  with pytest.raises(ValueError, match="leading axis"):
    run(cond=jnp.array([0, 1]), guidance_scale=2.0, null_cond=null_condition(CLASS, 3))


# ------------------------------------------------------------------ conditional training

K = 3  # classes of the toy conditional data; label K is the null class


def toy_cond_init(key):
  k1, k2 = jax.random.split(key)
  return {"net": tiny_init(k1), "label": 0.1 * jax.random.normal(k2, (K + 1, 1))}


def toy_cond_apply(params, x, t, labels):
  """tiny_apply plus a learned per-class offset."""
  return tiny_apply(params["net"], x, t) + params["label"][labels][:, None, None, :]


def toy_blind_apply(params, x, t, labels):
  """toy_cond_apply's parameters, but the condition ignored."""
  del labels
  return tiny_apply(params["net"], x, t) + 0.0 * params["label"][0]


def make_cond_data(n=12):
  """Images whose mean level is set by their class label."""
  labels = jnp.arange(n, dtype=jnp.int32) % K
  levels = jnp.array([-0.6, 0.0, 0.6])[labels]
  noise = 0.1 * jax.random.uniform(jax.random.key(3), (n, 4, 4, 1), minval=-1, maxval=1)
  return levels[:, None, None, None] + noise, labels


CFG = TrainConfig(num_steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=2,
                  segment_steps=3)
NULL = jnp.asarray(K, jnp.int32)  # one example's null condition


def _tree_equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_conditional_training_reduces_the_loss():
  cfg = TrainConfig(num_steps=60, batch_size=8, learning_rate=2e-2, warmup_steps=5,
                    segment_steps=30, cond_dropout=0.2)
  init_key, train_key = member_keys(0)
  _, losses = train(toy_cond_apply, toy_cond_init(init_key), SCHED, make_cond_data(), cfg,
                    train_key, progress=False, null_cond=NULL)
  assert losses.shape == (60,)
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])


@pytest.mark.slow
def test_conditional_unet_trains():
  cfg = TrainConfig(num_steps=30, batch_size=8, learning_rate=5e-3, warmup_steps=3,
                    segment_steps=30, cond_dropout=0.25)
  images, labels = make_cond_data(16)
  images = jax.image.resize(images, (16, 8, 8, 1), "nearest")
  init_key, train_key = member_keys(0)
  state, losses = train(models.make_apply_fn(CLASS), models.make_init_fn(CLASS)(init_key),
                        SCHED, (images, labels), cfg, train_key, progress=False,
                        null_cond=null_condition(CLASS, None))
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-10:]) < np.mean(losses[:10])
  assert "class_embed" in state.params


def test_unconditional_numbers_are_kept_by_conditional_data():
  """With a model that ignores the condition, conditional data train exactly as the
  images alone, with or without condition dropout: the batch positions, timesteps and
  noise do not move, and the dropout mask has its own key."""
  images, labels = make_cond_data()
  init_key, train_key = member_keys(1)
  params = toy_cond_init(init_key)
  plain = lambda p, x, t: toy_blind_apply(p, x, t, None)  # noqa: E731
  ref, ref_losses = train(plain, params, SCHED, images, CFG, train_key, progress=False)
  for p in (0.0, 0.5):
    cfg = dataclasses.replace(CFG, cond_dropout=p)
    state, losses = train(toy_blind_apply, params, SCHED, (images, labels), cfg, train_key,
                          progress=False, null_cond=NULL if p else None)
    np.testing.assert_array_equal(losses, ref_losses)
    _tree_equal(state.params, ref.params)


def test_zero_dropout_equals_no_dropout_and_full_dropout_is_the_null_condition():
  data = make_cond_data()
  init_key, train_key = member_keys(2)
  params = toy_cond_init(init_key)
  run = lambda cfg, data, null=None: train(  # noqa: E731
      toy_cond_apply, params, SCHED, data, cfg, train_key, progress=False, null_cond=null)
  base, base_losses = run(CFG, data)
  zero, zero_losses = run(dataclasses.replace(CFG, cond_dropout=0.0), data, NULL)
  np.testing.assert_array_equal(zero_losses, base_losses)
  _tree_equal(zero.params, base.params)
  # p = 1 drops every condition: the same as data labelled with the null class only.
  full, full_losses = run(dataclasses.replace(CFG, cond_dropout=1.0), data, NULL)
  nulls, null_losses = run(CFG, (data[0], jnp.full_like(data[1], K)))
  np.testing.assert_allclose(full_losses, null_losses, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               full.params, nulls.params)
  assert not np.allclose(full_losses, base_losses)


def test_dropout_is_reproducible():
  data = make_cond_data()
  cfg = dataclasses.replace(CFG, cond_dropout=0.5)
  runs = [train(toy_cond_apply, toy_cond_init(member_keys(0)[0]), SCHED, data, cfg,
                member_keys(0)[1], progress=False, null_cond=NULL) for _ in range(2)]
  np.testing.assert_array_equal(runs[0][1], runs[1][1])
  _tree_equal(runs[0][0].params, runs[1][0].params)


def test_drop_cond():
  key = jax.random.key(0)
  labels = jnp.zeros((10_000,), jnp.int32)
  dropped = loop_lib.drop_cond(key, labels, NULL, 0.3)
  assert set(np.unique(dropped)) == {0, K}
  assert abs(np.mean(dropped == K) - 0.3) < 0.02
  np.testing.assert_array_equal(loop_lib.drop_cond(key, labels, NULL, 0.3), dropped)
  assert not np.array_equal(loop_lib.drop_cond(jax.random.key(1), labels, NULL, 0.3), dropped)
  # A dict condition with a context: the rows drop together, a [1, E] null context
  # broadcasts over L, and dtypes are kept.
  cond = {"label": jnp.zeros((200,), jnp.int32), "context": jnp.ones((200, 4, 6))}
  null = null_condition(BOTH, None)
  out = loop_lib.drop_cond(key, cond, null, 0.5)
  gone = np.asarray(out["label"] == 3)
  assert 0 < gone.sum() < 200
  assert out["context"].dtype == cond["context"].dtype
  np.testing.assert_array_equal(np.asarray(out["context"])[gone], 0.0)
  np.testing.assert_array_equal(np.asarray(out["context"])[~gone], 1.0)
  with pytest.raises(ValueError, match="null_cond"):
    loop_lib.drop_cond(key, cond, NULL, 0.5)


def test_training_argument_errors():
  images, labels = make_cond_data()
  params = toy_cond_init(jax.random.key(0))
  cfg = dataclasses.replace(CFG, cond_dropout=0.1)
  with pytest.raises(ValueError, match="null_cond"):
    train(toy_cond_apply, params, SCHED, (images, labels), cfg, jax.random.key(0),
          progress=False)
  with pytest.raises(ValueError, match="conditional"):
    train(toy_cond_apply, params, SCHED, images, cfg, jax.random.key(0), progress=False,
          null_cond=NULL)
  with pytest.raises(ValueError, match="leading axis"):
    train(toy_cond_apply, params, SCHED, (images, labels[:5]), CFG, jax.random.key(0),
          progress=False)
  with pytest.raises(ValueError, match="cond_dropout"):
    TrainConfig(cond_dropout=1.5)


def test_checkpoint_job_is_unchanged_without_dropout():
  assert "cond_dropout" not in loop_lib.job_config(CFG)
  assert loop_lib.job_config(CFG) == {
      k: v for k, v in dataclasses.asdict(CFG).items() if k != "cond_dropout"}
  cfg = dataclasses.replace(CFG, cond_dropout=0.1)
  a, b = loop_lib.job_config(cfg, NULL), loop_lib.job_config(cfg, NULL + 0)
  assert a == b and a["cond_dropout"] == 0.1 and "null_cond" in a
  assert loop_lib.job_config(cfg, jnp.asarray(0, jnp.int32)) != a


# vmap closes over the condition as map does; its run is the slow twin.
@pytest.mark.parametrize("strategy", ["map", pytest.param("vmap", marks=pytest.mark.slow)])
def test_train_many_with_conditions_equals_separate_training(strategy):
  data = make_cond_data()
  cfg = dataclasses.replace(CFG, cond_dropout=0.3)
  subsets = [np.array([0, 2, 4, 6, 8]), np.array([1, 3, 5, 7, 9, 11])]
  seeds = [5, 7]
  res = train_many(toy_cond_apply, toy_cond_init, SCHED, data, subsets, seeds, cfg,
                   strategy=strategy, progress=False, null_cond=NULL)
  assert res.losses.shape == (2, cfg.num_steps)
  for m, (sub, seed) in enumerate(zip(subsets, seeds)):
    init_key, train_key = member_keys(seed)
    alone, losses = train(toy_cond_apply, toy_cond_init(init_key), SCHED, data, cfg,
                          train_key, indices=sub, progress=False, null_cond=NULL)
    np.testing.assert_allclose(res.losses[m], losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x[m], y, rtol=1e-4, atol=1e-6),
                 res.state.ema_params, alone.ema_params)
