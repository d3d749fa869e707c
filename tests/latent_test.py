"""Latent diffusion: the autoencoder, the latent space, and attribution in latent space.

The autoencoder is trained once per module (``trained``: 300 Adam steps on all 1,797
digits, ~10 s on 2 CPU cores); the other tests reuse it or build untrained ones.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import diffusion
from jattr.data import Dataset, load_digits
from jattr.diffusion.latent import (LatentSpace, check_space, decode_latents, encode_images,
                                    identity_space, latent_dataset)
from jattr.features import ProjectionConfig, featurize
from jattr.methods import trak_fit, trak_score
from jattr.models import (AutoencoderConfig, autoencoder_space, latent_scale,
                          make_autoencoder_fns, train_autoencoder)
from jattr.train import TrainConfig, train
from toy_models import tiny_apply, tiny_init

CONFIG = AutoencoderConfig(image_shape=(8, 8, 1), latent_channels=2, downsample=2,
                           channels=(32, 32))
STEPS = 300


@pytest.fixture(scope="module")
def digits():
  return load_digits()


@pytest.fixture(scope="module")
def trained(digits):
  params, losses = train_autoencoder(CONFIG, digits.x, jax.random.key(0), num_steps=STEPS,
                                     batch_size=64, learning_rate=2e-3)
  return params, losses


# --- the autoencoder -----------------------------------------------------------------

@pytest.mark.parametrize("downsample, channels, latent", [(1, (8,), (8, 8, 3)),
                                                          (2, (8, 16), (4, 4, 3)),
                                                          (4, (8, 8, 8), (2, 2, 3)),
                                                          (8, (4, 4, 4, 4), (1, 1, 3))])
def test_autoencoder_shapes(downsample, channels, latent):
  config = AutoencoderConfig(image_shape=(8, 8, 2), latent_channels=3, downsample=downsample,
                             channels=channels)
  assert config.latent_shape == latent
  init, encode, decode = make_autoencoder_fns(config)
  params = jax.eval_shape(init, jax.random.key(0))
  assert set(params) == {"encoder", "decoder", "scale"} and params["scale"].shape == ()
  x = jax.ShapeDtypeStruct((5, 8, 8, 2), jnp.float32)
  z = jax.eval_shape(encode, params, x)
  assert z.shape == (5,) + latent
  assert jax.eval_shape(decode, params, z).shape == (5, 8, 8, 2)


def test_autoencoder_runs_and_its_scale_is_folded_in():
  init, encode, decode = make_autoencoder_fns(CONFIG)
  params = init(jax.random.key(0))
  assert float(params["scale"]) == 1.0
  x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1, maxval=1)
  z = jax.jit(encode)(params, x)
  x_hat = jax.jit(decode)(params, z)
  assert z.shape == (3, 4, 4, 2) and x_hat.shape == x.shape
  assert np.all(np.isfinite(np.asarray(x_hat)))
  # decode(encode(x)) = D(E(x)) whatever the scale s: z scales by s, D reads z / s.
  scaled = {**params, "scale": jnp.float32(4.0)}
  np.testing.assert_allclose(jax.jit(encode)(scaled, x), 4.0 * z, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(decode)(scaled, 4.0 * z), x_hat, rtol=1e-5, atol=1e-6)


def test_autoencoder_config_and_params_are_checked():
  with pytest.raises(ValueError, match="power of 2"):
    AutoencoderConfig(downsample=3, channels=(8, 8))
  with pytest.raises(ValueError, match="log2"):
    AutoencoderConfig(downsample=4, channels=(8, 8))
  with pytest.raises(ValueError, match="divisible"):
    AutoencoderConfig(image_shape=(6, 6, 1), downsample=4, channels=(8, 8, 8))
  with pytest.raises(ValueError, match="latent_channels"):
    AutoencoderConfig(latent_channels=0)
  assert hash(AutoencoderConfig(channels=[32, 32])) == hash(AutoencoderConfig())
  init, encode, _ = make_autoencoder_fns(CONFIG)
  params = init(jax.random.key(0))
  with pytest.raises(ValueError, match=r"x must be \[B, 8, 8, 1\]"):
    encode(params, jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="scale"):
    encode({k: v for k, v in params.items() if k != "scale"}, jnp.zeros((2, 8, 8, 1)))
  other = make_autoencoder_fns(AutoencoderConfig(channels=(16, 16))).init(jax.random.key(0))
  with pytest.raises(ValueError, match="shape"):
    encode(other, jnp.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    train_autoencoder(CONFIG, np.full((4, 8, 8, 1), 3.0, np.float32), jax.random.key(0),
                      num_steps=1)
  with pytest.raises(ValueError, match="scaling"):
    train_autoencoder(CONFIG, np.zeros((4, 8, 8, 1), np.float32), jax.random.key(0),
                      num_steps=1, scaling="unit")


def test_training_reconstructs_digits_well_below_their_variance(digits, trained):
  params, losses = trained
  assert losses.shape == (STEPS,) and np.all(np.isfinite(losses))
  assert losses[-20:].mean() < 0.1 * losses[:5].mean()
  space = autoencoder_space(CONFIG, params)
  x_hat = decode_latents(space, encode_images(space, digits.x))
  mse = float(np.mean((x_hat - digits.x) ** 2))
  variance = float(np.var(digits.x))        # the MSE of predicting the mean image: ~0.57
  # measured: mse ~0.019 after 300 steps (the untrained autoencoder: ~0.7)
  assert mse < 0.1 * variance, (mse, variance)
  assert x_hat.min() >= -1.0 and x_hat.max() <= 1.0


def test_trained_latents_have_unit_variance(digits, trained):
  params, _ = trained
  z = encode_images(autoencoder_space(CONFIG, params), digits.x)
  assert z.shape == (len(digits), 4, 4, 2) and z.dtype == np.float32
  assert abs(float(np.std(z)) - 1.0) < 1e-3
  assert float(params["scale"]) > 0
  # scaling="max" would give the scale that maps the same latents into [-1, 1]
  unscaled = z / float(params["scale"])
  s_max = latent_scale(unscaled, "max")
  assert abs(float(np.abs(unscaled * s_max).max()) - 1.0) < 1e-6
  assert s_max < float(params["scale"])   # unit-variance latents exceed ±1 somewhere


def test_training_is_deterministic_given_the_key(digits):
  # The same settings as the `trained` fixture but fewer steps: shares its compiled step.
  run = functools.partial(train_autoencoder, CONFIG, digits.x, num_steps=20, batch_size=64,
                          learning_rate=2e-3)
  a, loss_a = run(jax.random.key(3))
  b, loss_b = run(jax.random.key(3))
  c, _ = run(jax.random.key(4))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(loss_a, loss_b)
  assert not np.array_equal(a["encoder"]["conv_in"]["kernel"], c["encoder"]["conv_in"]["kernel"])


def test_train_autoencoder_reports_progress(digits):
  calls = []
  train_autoencoder(CONFIG, digits.x, jax.random.key(3), num_steps=20, batch_size=64,
                    learning_rate=2e-3, progress=lambda *a, **m: calls.append((a, m)))
  assert [c[0] for c in calls] == [("autoencoder", 20, 20)] and "loss" in calls[0][1]


# --- the latent space ----------------------------------------------------------------

def test_identity_space_round_trips_exactly(digits):
  space = identity_space((8, 8, 1))
  z = encode_images(space, digits.x, batch_size=500)     # 1797 = 3 * 500 + 297: padded
  assert z.dtype == np.float32
  np.testing.assert_array_equal(z, digits.x)
  np.testing.assert_array_equal(decode_latents(space, z, batch_size=7), digits.x)
  latent = latent_dataset(space, digits)
  assert isinstance(latent, Dataset) and latent.name == digits.name
  np.testing.assert_array_equal(latent.x, digits.x)
  np.testing.assert_array_equal(latent.y, digits.y)


def test_batching_does_not_change_the_latents(digits, trained):
  space = autoencoder_space(CONFIG, trained[0])
  x = digits.x[:50]
  whole = encode_images(space, x, batch_size=50)
  np.testing.assert_allclose(encode_images(space, x, batch_size=16), whole, atol=1e-5)
  np.testing.assert_allclose(decode_latents(space, whole, batch_size=16),
                             decode_latents(space, whole, batch_size=64), atol=1e-5)


def test_decoded_images_are_clipped_to_the_image_range():
  space = LatentSpace(lambda x: x[:, ::2, ::2] * 3.0, lambda z: jnp.repeat(
      jnp.repeat(z, 2, axis=1), 2, axis=2), (4, 4, 1))
  z = np.full((2, 2, 2, 1), 2.0, np.float32)
  out = decode_latents(space, z)
  assert out.shape == (2, 4, 4, 1) and out.max() == 1.0
  assert decode_latents(LatentSpace(space.encode, space.decode), -z).min() == -1.0  # no shape


def test_shapes_are_checked_with_clear_errors():
  x = np.zeros((3, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match=r"space is for images of shape \(4, 4, 1\)"):
    encode_images(identity_space((4, 4, 1)), x)
  lossy = LatentSpace(lambda x: x[:, ::2, ::2], lambda z: z)   # decode forgets to upsample
  with pytest.raises(ValueError, match=r"decode\(encode\(x\)\) must have the shape of x"):
    encode_images(lossy, x)
  flat = LatentSpace(lambda x: x.reshape(len(x), -1), lambda z: z.reshape(-1, 8, 8, 1))
  with pytest.raises(ValueError, match=r"latents \[B, h, w, c\]"):
    encode_images(flat, x)
  with pytest.raises(ValueError, match="fails on a batch"):
    encode_images(LatentSpace(lambda x: x @ jnp.ones((3, 3)), lambda z: z), x)
  with pytest.raises(ValueError, match="floating-point"):
    encode_images(identity_space((8, 8, 1)), x.astype(np.uint8))
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    encode_images(identity_space((8, 8, 1)), x[0])
  with pytest.raises(ValueError, match=r"z must be latents \[N, 8, 8, 1\]"):
    decode_latents(identity_space((8, 8, 1)), np.zeros((3, 4, 4, 1), np.float32))
  with pytest.raises(TypeError, match="callable"):
    LatentSpace(None, lambda z: z)
  with pytest.raises(TypeError, match="LatentSpace"):
    check_space((lambda x: x, lambda z: z), (8, 8, 1))
  with pytest.raises(TypeError, match="Dataset"):
    latent_dataset(identity_space((8, 8, 1)), x)


# --- attribution in latent space ------------------------------------------------------

SCHED = diffusion.linear(50)
TINY = TrainConfig(num_steps=20, batch_size=8, learning_rate=1e-2, warmup_steps=1,
                   segment_steps=20)


def _trak(params, x_train, x_query, draws):
  f = diffusion.measurement_fn("square_norm", tiny_apply, SCHED, draws)
  proj = ProjectionConfig(dim=32, seed=0)
  phi_train = featurize(f, params, x_train, proj, chunk_size=16)
  phi_query = featurize(f, params, x_query, proj, chunk_size=16)
  return phi_train, phi_query, trak_score(trak_fit(phi_train), phi_query)


def _identity_vs_pixels(digits, trained: bool):
  """(params, losses, train features, query features, scores) of the pixels ds.x and of
  their identity-space latents, each trained on (``trained``) or with the initial params."""
  ds = Dataset(digits.x[:32], digits.y[:32], digits.name)
  latent = latent_dataset(identity_space(ds.shape), ds)
  draws = diffusion.fixed_draws(jax.random.key(5), 3, ds.shape, SCHED.num_timesteps)
  out = []
  for x in (ds.x, latent.x):
    params, losses = tiny_init(jax.random.key(0)), np.zeros(0)
    if trained:
      state, losses = train(tiny_apply, params, SCHED, x, TINY, jax.random.key(1))
      params = state.ema_params
    out.append((params, losses, *_trak(params, x, digits.x[40:44], draws)))
  return out


def _assert_bit_identical(pix, lat):
  (p_pix, l_pix, *rest_pix), (p_lat, l_lat, *rest_lat) = pix, lat
  for a, b in zip(jax.tree.leaves(p_pix), jax.tree.leaves(p_lat)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(l_pix, l_lat)
  for a, b in zip(rest_pix, rest_lat):          # train features, query features, scores
    np.testing.assert_array_equal(a, b)
  assert rest_pix[2].shape == (4, 32) and np.all(np.isfinite(np.asarray(rest_pix[2])))


def test_latent_attribution_is_pixel_attribution_in_the_identity_space(digits):
  """Fast twin of the next test: the same features and scores at the initial params."""
  _assert_bit_identical(*_identity_vs_pixels(digits, trained=False))


@pytest.mark.slow
def test_latent_attribution_is_pixel_attribution_in_the_identity_space_after_training(digits):
  """Training on identity-space latents is training on the pixels, bit for bit, and so
  are the TRAK features and scores of the trained model (~20 s: two trainings)."""
  _assert_bit_identical(*_identity_vs_pixels(digits, trained=True))


def _end_to_end(digits, ae_params, train_steps: int):
  """AE → latents → tiny diffusion model on latents (trained for ``train_steps``, or
  untrained for 0) → DDIM latents → images, and TRAK scores of the generated latents
  against the training latents. Shapes and finiteness only: a 20-step model on 4×4×2
  latents is not a good generator, and its quality is not measured here."""
  # scaling="max" for the same network: training latents in [-1, 1], which
  # jattr.train.train requires (unit-variance latents exceed it).
  unscaled = encode_images(autoencoder_space(CONFIG, {**ae_params, "scale": jnp.float32(1.0)}),
                           digits.x)
  space = autoencoder_space(CONFIG, {**ae_params, "scale": jnp.float32(
      latent_scale(unscaled, "max"))})
  ds = latent_dataset(space, Dataset(digits.x[:64], digits.y[:64], digits.name))
  assert ds.x.shape == (64, 4, 4, 2) and np.abs(ds.x).max() <= 1.0
  params = tiny_init(jax.random.key(0), c=2)
  if train_steps:
    state, losses = train(tiny_apply, params, SCHED, ds.x,
                          dataclasses.replace(TINY, num_steps=train_steps,
                                              segment_steps=train_steps), jax.random.key(1))
    assert np.all(np.isfinite(losses))
    params = state.ema_params
  z0 = diffusion.ddim_sample(tiny_apply, params, SCHED, jax.random.key(2), (4, 4, 4, 2),
                             num_steps=10)
  images = decode_latents(space, z0)
  assert images.shape == (4, 8, 8, 1) and images.min() >= -1 and images.max() <= 1
  queries = encode_images(space, images)      # the generated images, re-encoded
  assert queries.shape == (4, 4, 4, 2)
  draws = diffusion.fixed_draws(jax.random.key(5), 3, ds.shape, SCHED.num_timesteps)
  phi_train, phi_query, tau = _trak(params, ds.x, queries, draws)
  assert phi_train.shape == (64, 32) and phi_query.shape == (4, 32)
  assert tau.shape == (4, 64) and np.all(np.isfinite(np.asarray(tau)))
  _, _, tau_z0 = _trak(params, ds.x, np.asarray(z0), draws)   # the latents as sampled
  assert tau_z0.shape == (4, 64) and np.all(np.isfinite(np.asarray(tau_z0)))


def test_end_to_end_latent_pipeline(digits, trained):
  """Fast twin of the next test: the pipeline with the diffusion model untrained."""
  _end_to_end(digits, trained[0], train_steps=0)


@pytest.mark.slow
def test_end_to_end_latent_diffusion_and_attribution(digits, trained):
  """The pipeline with a diffusion model trained for 20 steps on the latents (~20 s)."""
  _end_to_end(digits, trained[0], train_steps=20)
