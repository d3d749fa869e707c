"""A small deterministic convolutional autoencoder in flax NNX, for latent diffusion.

The autoencoder maps an image to a smaller latent and back,

    E: x [B, H, W, C] -> z [B, H/f, W/f, c],      D: z -> x̂ [B, H, W, C],

f = ``downsample`` (a power of 2), c = ``latent_channels``. It is the first stage of a
latent diffusion model (Rombach et al. 2022) cut down to what 8×8 images need:

* encoder: Conv3×3 (C → channels[0]) → SiLU, then per halving a strided Conv3×3
  (channels[i] → channels[i+1]) → SiLU, then Conv3×3 (→ c), linear;
* decoder, the mirror: Conv3×3 (c → channels[-1]) → SiLU, then per doubling a
  nearest-neighbour ×2 upsampling and Conv3×3 (channels[i+1] → channels[i]) → SiLU,
  then Conv3×3 (→ C), linear (``jattr.diffusion.latent.decode_latents`` clips to
  [−1, 1]).

It is deterministic (no VAE sampling and no KL to a prior): z is a function of x.
Training (``train_autoencoder``) minimises the reconstruction error plus a tiny L2
penalty on the latents,

    L(φ) = mean_i ‖D(E(x_i)) − x_i‖² / (H W C)  +  λ · mean_i ‖E(x_i)‖² / (h w c),

with λ = ``latent_penalty`` (default 1e−4): the reconstruction alone does not fix the
latents' scale (D can undo any rescaling of E), and the penalty keeps it from
drifting, much as the weak KL term does in Stable Diffusion's VAE.

Latent scale. After training the latents are rescaled by one scalar s, folded into the
pure functions (``params["scale"]``):

    encode(params, x) = s · E(x),       decode(params, z) = D(z / s),

so decode(encode(x)) = D(E(x)) for every s: the scale changes what the diffusion model
sees, not the reconstruction. Why it matters: the forward process noises a latent as
z_t = √ᾱ_t z + √(1 − ᾱ_t) ε, so its signal-to-noise ratio is

    SNR(t) = ᾱ_t σ_z² / (1 − ᾱ_t),

and a schedule designed for data of about unit scale (images in [−1, 1]) would, on
latents of arbitrary spread σ_z, destroy the signal too early (σ_z ≪ 1) or too late
(σ_z ≫ 1). With ``scaling="std"`` (default) s = 1 / std(E(x_i)), the standard
deviation over every entry of every training latent (about their mean, which is not
subtracted), so the training latents have unit variance: Stable Diffusion's factor
0.18215 is this number for its VAE, measured once on a batch of training latents.
With ``scaling="max"`` s = 1 / max|E(x_i)|, so the training latents lie in [−1, 1],
the range ``jattr.train.train`` checks and the samplers' ``clip_x0`` clips to, at a
smaller σ_z (0.34 for the digits autoencoder of ``tests/latent_test.py``).

The autoencoder is fixed once trained: a diffusion model trained on its latents is
attributed with respect to the diffusion parameters only, its training examples
being the latents of the training images (``jattr.diffusion.latent``).

Parameters follow ``bridge.py``: a pure nested dict (string keys) from
``nnx.to_pure_dict``, ``{"encoder": {...}, "decoder": {...}, "scale": f32 scalar}``;
``make_autoencoder_fns`` gives the pure ``init``, ``encode`` and ``decode``.

Latent runs and benchmarks. ``LatentConfig`` is the autoencoder of a latent-diffusion
run (``jattr.runs.RunConfig.latent``, ``jattr run --latent``) or LDS benchmark
(``LdsSpec.latent``): the architecture less the image shape (which comes from the
data) and the training recipe, always with ``scaling="max"`` so that the latents can
be trained on with ``jattr.train``; ``LatentConfig.fit(images)`` trains it, and
``pack_autoencoder`` / ``unpack_autoencoder`` turn it into named arrays and back
(the run directory and the LDS cache store them in an ``.npz``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattr.diffusion.checks import check_image_range
from jattr.diffusion.latent import LatentSpace
from jattr.models.bridge import _check_params, _draw, _expected_shapes, _fill
from jattr.models.conv import im2col_conv
from jattr.models.unet import resolve_conv_impl
from jattr.progress import Progress
from jattr.progress import resolve as resolve_progress
from jattr.types import Params

SCALINGS = ("std", "max")
REPORT_EVERY = 100
"""``train_autoencoder`` reports progress (and checks the loss) every this many steps."""


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Static description of an autoencoder; frozen, so hashable and jit-static.

  Attributes:
    image_shape: (H, W, C) of one image; H and W must be divisible by ``downsample``.
    latent_channels: c, the channels of the latent [H/f, W/f, c].
    downsample: f, the total spatial downsampling, a power of 2 (1: no downsampling).
    channels: the hidden channels at each resolution, one entry per level:
      ``len(channels) == log2(downsample) + 1``.
    conv_impl: ``"xla"`` (default), ``"im2col"`` or ``"auto"``, as
      ``UNetConfig.conv_impl``. The default is native convolutions because nothing
      runs the autoencoder inside a loop (``train_autoencoder`` steps from the host,
      encoding is one call per batch), where native convolutions compile faster.
  """

  image_shape: tuple[int, int, int] = (8, 8, 1)
  latent_channels: int = 2
  downsample: int = 2
  channels: tuple[int, ...] = (32, 32)
  conv_impl: str = "xla"

  def __post_init__(self):
    for name in ("image_shape", "channels"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if len(self.image_shape) != 3 or min(self.image_shape) < 1:
      raise ValueError(f"image_shape must be (H, W, C) with positive entries, "
                       f"got {self.image_shape}")
    f = int(self.downsample)
    if f < 1 or f & (f - 1):
      raise ValueError(f"downsample must be a power of 2 (1, 2, 4, ...), got {self.downsample}")
    h, w, _ = self.image_shape
    if h % f or w % f:
      raise ValueError(f"image_shape {self.image_shape}: H and W must be divisible by "
                       f"downsample = {f}")
    levels = int(math.log2(f)) + 1
    if len(self.channels) != levels or min(self.channels) < 1:
      raise ValueError(f"channels must hold log2(downsample) + 1 = {levels} positive ints (one "
                       f"per resolution) for downsample = {f}, got {self.channels}")
    if self.latent_channels < 1:
      raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")
    if self.conv_impl not in ("auto", "xla", "im2col"):
      raise ValueError(f"conv_impl must be 'auto', 'xla' or 'im2col', got {self.conv_impl!r}")

  @property
  def latent_shape(self) -> tuple[int, int, int]:
    """(h, w, c) = (H/f, W/f, latent_channels)."""
    h, w, _ = self.image_shape
    return (h // self.downsample, w // self.downsample, self.latent_channels)


def _conv(in_ch: int, out_ch: int, impl: str, rngs: nnx.Rngs, stride: int = 1) -> nnx.Conv:
  fn = im2col_conv if resolve_conv_impl(impl) == "im2col" else jax.lax.conv_general_dilated
  return nnx.Conv(in_ch, out_ch, (3, 3), strides=(stride, stride), conv_general_dilated=fn,
                  rngs=rngs)


class Encoder(nnx.Module):
  """x [B, H, W, C] -> E(x) [B, H/f, W/f, c] (unscaled)."""

  def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
    ch, impl = config.channels, config.conv_impl
    self.conv_in = _conv(config.image_shape[-1], ch[0], impl, rngs)
    self.down = nnx.List([_conv(ch[i], ch[i + 1], impl, rngs, stride=2)
                          for i in range(len(ch) - 1)])
    self.conv_out = _conv(ch[-1], config.latent_channels, impl, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = nnx.silu(self.conv_in(x))
    for conv in self.down:
      h = nnx.silu(conv(h))
    return self.conv_out(h)


def _upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour ×2 in H and W."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Decoder(nnx.Module):
  """z [B, H/f, W/f, c] -> D(z) [B, H, W, C] (unscaled latents, unclipped images)."""

  def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
    ch, impl = config.channels, config.conv_impl
    self.conv_in = _conv(config.latent_channels, ch[-1], impl, rngs)
    self.up = nnx.List([_conv(ch[i + 1], ch[i], impl, rngs)
                        for i in reversed(range(len(ch) - 1))])
    self.conv_out = _conv(ch[0], config.image_shape[-1], impl, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = nnx.silu(self.conv_in(z))
    for conv in self.up:
      h = nnx.silu(conv(_upsample(h)))
    return self.conv_out(h)


class Autoencoder(nnx.Module):
  """The encoder and decoder; its only state is ``nnx.Param`` (no scale: see the module
  docstring, the scale lives in the pure params)."""

  def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decoder(self.encoder(x))


class AutoencoderFns(NamedTuple):
  """The pure functions of one ``AutoencoderConfig`` (a tuple: ``init, encode, decode =
  make_autoencoder_fns(config)``)."""

  init: Callable[[jax.Array], Params]
  encode: Callable[[Params, jax.Array], jax.Array]
  decode: Callable[[Params, jax.Array], jax.Array]


def _check_shape(a: jax.Array, shape: tuple[int, ...], what: str) -> None:
  if a.ndim != 4 or tuple(a.shape[1:]) != tuple(shape):
    raise ValueError(f"{what} must be [B, {', '.join(map(str, shape))}], got shape "
                     f"{tuple(a.shape)}")


def make_autoencoder_fns(config: AutoencoderConfig) -> AutoencoderFns:
  """The pure ``init(key) -> params``, ``encode(params, x) -> z`` and ``decode(params, z)
  -> x̂`` of an autoencoder.

  ``params`` is ``{"encoder": ..., "decoder": ..., "scale": float32 scalar}`` (string
  keys); ``init`` sets ``scale`` to 1 and draws the kernels as ``make_init_fn`` does
  (LeCun normal, one draw for all kernels; zero biases). ``encode(params, x)`` =
  scale · E(x) with x [B, H, W, C] → z [B, h, w, c] (``config.latent_shape``), and
  ``decode(params, z)`` = D(z / scale), unclipped. All three are safe under ``jit``,
  ``grad`` and ``vmap``; shapes are checked when traced. Equal configs get the same
  function objects, so jitted calls share their compiled programs.
  """
  if not isinstance(config, AutoencoderConfig):
    raise TypeError(f"config must be an AutoencoderConfig, got {type(config).__name__}")
  return _fns(config)


@functools.lru_cache(maxsize=32)
def _fns(config: AutoencoderConfig) -> AutoencoderFns:
  graphdef, template = nnx.split(
      nnx.eval_shape(lambda: Autoencoder(config, rngs=nnx.Rngs(0))), nnx.Param)
  expected = _expected_shapes(template)

  def module(params: Params) -> Autoencoder:
    if not isinstance(params, dict) or "scale" not in params:
      raise ValueError("autoencoder params must be the dict {'encoder', 'decoder', 'scale'} "
                       "of make_autoencoder_fns(config).init or train_autoencoder")
    net = {k: v for k, v in params.items() if k != "scale"}
    _check_params(net, expected)
    return nnx.merge(graphdef, _fill(template, net))

  def init(key: jax.Array) -> Params:
    params = _draw(template, key)
    params["scale"] = jnp.ones((), jnp.float32)
    return params

  def encode(params: Params, x: jax.Array) -> jax.Array:
    _check_shape(x, config.image_shape, "x")
    return module(params).encoder(x) * params["scale"]

  def decode(params: Params, z: jax.Array) -> jax.Array:
    _check_shape(z, config.latent_shape, "z")
    return module(params).decoder(z / params["scale"])

  return AutoencoderFns(init, encode, decode)


@functools.lru_cache(maxsize=32)
def _jitted(config: AutoencoderConfig) -> AutoencoderFns:
  """``jax.jit`` of each function of ``_fns(config)``, shared by equal configs."""
  return AutoencoderFns(*(jax.jit(fn) for fn in _fns(config)))


def _check_train_images(config: AutoencoderConfig, images) -> jax.Array:
  images = jnp.asarray(images)
  if images.ndim != 4 or tuple(images.shape[1:]) != config.image_shape:
    raise ValueError(f"images must be [N, {', '.join(map(str, config.image_shape))}] "
                     f"(config.image_shape), got shape {tuple(images.shape)}")
  if images.shape[0] == 0:
    raise ValueError("images is empty: training needs at least one image")
  check_image_range(images, "images")
  return images.astype(jnp.float32)


def latent_scale(latents, scaling: str = "std") -> float:
  """The scale s of the module docstring for unscaled latents E(x_i) [N, h, w, c]:
  1/std over all entries (``"std"``) or 1/max|·| (``"max"``)."""
  if scaling not in SCALINGS:
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
  z = np.asarray(latents, np.float64)
  spread = float(np.std(z)) if scaling == "std" else float(np.max(np.abs(z)))
  if not np.isfinite(spread) or spread <= 0.0:
    raise ValueError(f"the latents' {'standard deviation' if scaling == 'std' else 'max |z|'}"
                     f" is {spread}: the encoder collapsed or diverged; no scale exists")
  return 1.0 / spread


def train_autoencoder(config: AutoencoderConfig, images, key: jax.Array, *,
                      num_steps: int = 500, batch_size: int = 64,
                      learning_rate: float = 2e-3, latent_penalty: float = 1e-4,
                      scaling: str = "std", progress: Progress | None = None
                      ) -> tuple[Params, np.ndarray]:
  """Trains the autoencoder on ``images`` with Adam, then sets its latent scale.

  The objective is the module docstring's L (reconstruction MSE + ``latent_penalty``
  × mean squared latent), on batches drawn uniformly with replacement. Deterministic
  given ``key``: ``split(key)`` gives the init key and the data key, and step n draws
  its batch from ``fold_in(data_key, n)``. Each step is one jitted call (compiled once
  per config, batch size and hyperparameters, and shared by later calls); the steps
  run from a host loop, where native convolutions are fast on CPU (in a ``lax.scan``
  they are not: ``jattr.models.conv``). After training s = ``latent_scale(E(images),
  scaling)`` is stored in ``params["scale"]``.

  Args:
    config: the architecture.
    images: training images [N, H, W, C] in [−1, 1].
    key: PRNG key.
    num_steps: Adam steps.
    batch_size: images per step.
    learning_rate: Adam's (constant) learning rate.
    latent_penalty: λ of the L2 penalty on the (unscaled) latents.
    scaling: ``"std"`` (unit-variance latents) or ``"max"`` (latents in [−1, 1]).
    progress: ``progress("autoencoder", steps_done, num_steps, loss=...)`` every
      ``REPORT_EVERY`` steps and after the last, with the mean loss since the previous
      report (``jattr.progress``).

  Returns:
    ``(params, losses)``: params as ``make_autoencoder_fns(config).init`` returns them,
    with the scale set, and the training loss of every step [num_steps].

  Raises:
    ValueError: on bad images or arguments, or when the loss becomes non-finite.
  """
  images = _check_train_images(config, images)
  for name, value in (("num_steps", num_steps), ("batch_size", batch_size)):
    if int(value) < 1:
      raise ValueError(f"{name} must be >= 1, got {value}")
  if scaling not in SCALINGS:
    raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
  if latent_penalty < 0:
    raise ValueError(f"latent_penalty must be >= 0, got {latent_penalty}")
  params, opt_state, data_key = _start(key, config=config,
                                       learning_rate=float(learning_rate))
  one = jnp.ones((), jnp.float32)
  report = resolve_progress(progress)
  options = dict(config=config, batch_size=int(batch_size),
                 learning_rate=float(learning_rate), latent_penalty=float(latent_penalty))
  losses, pending = [], []
  for n in range(int(num_steps)):
    params, opt_state, loss = _step(params, opt_state, images, data_key,
                                    jnp.asarray(n, jnp.int32), **options)
    pending.append(loss)
    if len(pending) == REPORT_EVERY or n + 1 == int(num_steps):
      seg = np.asarray(jnp.stack(pending))
      if not np.all(np.isfinite(seg)):
        bad = int(np.argmin(np.isfinite(seg)))
        raise ValueError(f"autoencoder training diverged at step {len(losses) + bad} (loss "
                         f"{seg[bad]}); use a smaller learning_rate")
      losses.extend(seg.tolist())
      pending = []
      report("autoencoder", n + 1, int(num_steps), loss=float(np.mean(seg)))
  params = {**params, "scale": one}
  encode = _jitted(config).encode
  latents = np.concatenate([np.asarray(encode(params, images[i:i + 512]))
                            for i in range(0, images.shape[0], 512)])
  params["scale"] = jnp.asarray(latent_scale(latents, scaling), jnp.float32)
  return params, np.asarray(losses, np.float32)


@functools.partial(jax.jit, static_argnames=("config", "learning_rate"))
def _start(key, *, config, learning_rate):
  """``(net params, Adam state, data key)`` of ``train_autoencoder`` from its key, in one
  compiled program (eagerly, each random draw and ``zeros_like`` compiles apart)."""
  init_key, data_key = jax.random.split(key)
  net = _fns(config).init(init_key)
  del net["scale"]
  return net, optax.adam(learning_rate).init(net), data_key


@functools.partial(jax.jit, static_argnames=("config", "batch_size", "learning_rate",
                                             "latent_penalty"))
def _step(net, opt_state, images, data_key, index, *, config, batch_size, learning_rate,
          latent_penalty):
  """Adam step ``index`` of ``train_autoencoder``: ``(net, opt_state, loss)``."""
  fns = _fns(config)

  def loss_fn(net, x):
    p = {**net, "scale": jnp.ones((), x.dtype)}
    z = fns.encode(p, x)
    recon = jnp.mean((fns.decode(p, z) - x) ** 2)
    return recon + latent_penalty * jnp.mean(z ** 2)

  rows = jax.random.randint(jax.random.fold_in(data_key, index), (batch_size,), 0,
                            images.shape[0])
  loss, grads = jax.value_and_grad(loss_fn)(net, images[rows])
  updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, net)
  return optax.apply_updates(net, updates), opt_state, loss


class _Bound:
  """``fn(params, a)`` with params bound, calling a jitted ``fn`` with params as an
  argument (not baked into the compiled program as constants)."""

  def __init__(self, fn, params):
    self.fn, self.params = fn, params

  def __call__(self, a: jax.Array) -> jax.Array:
    return self.fn(self.params, a)


def autoencoder_space(config: AutoencoderConfig, params: Params) -> LatentSpace:
  """The ``LatentSpace`` of an autoencoder: ``encode(x) = s·E(x)``, ``decode(z) =
  D(z/s)`` with the params (and their scale s) bound; both jitted.

  Example:
    >>> params, _ = train_autoencoder(config, digits, jax.random.key(0), num_steps=300)
    >>> space = autoencoder_space(config, params)
    >>> z = jattr.diffusion.latent.encode_images(space, digits)   # [N, 4, 4, 2]
  """
  make_autoencoder_fns(config)  # checks the config
  fns = _jitted(config)
  jax.eval_shape(fns.encode, params, jax.ShapeDtypeStruct((1,) + config.image_shape,
                                                          jnp.float32))  # checks params
  return LatentSpace(_Bound(fns.encode, params), _Bound(fns.decode, params),
                     config.image_shape)



# ---------------------------------------------------------------------------------
# The autoencoder of a latent run or benchmark: its config, and its parameters as arrays
# ---------------------------------------------------------------------------------

LATENT_SCALING = "max"
"""The latent scaling of runs and benchmarks: latents in [−1, 1], which ``jattr.train``
requires and the samplers' ``clip_x0`` assumes."""
PACK_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class LatentConfig:
  """The autoencoder of a latent-diffusion run or benchmark, and how it is trained.

  The image shape is not a field: it is the data's, so ``autoencoder(image_shape)``
  gives the ``AutoencoderConfig`` and ``latent_shape(image_shape)`` the shape the
  diffusion model works on, (H/f, W/f, latent_channels). ``fit(images)`` trains it:
  ``train_autoencoder(..., key(seed), scaling="max")`` (``LATENT_SCALING``),
  deterministic given the config and the images.

  Attributes:
    latent_channels: c of the latents.
    downsample: f, a power of 2.
    channels: hidden channels per resolution, ``log2(f) + 1`` entries.
    num_steps, batch_size, learning_rate, latent_penalty: the Adam recipe of
      ``train_autoencoder``.
    seed: the training key is ``jax.random.key(seed)``.
  """

  latent_channels: int = 2
  downsample: int = 2
  channels: tuple[int, ...] = (32, 32)
  num_steps: int = 1000
  batch_size: int = 64
  learning_rate: float = 2e-3
  latent_penalty: float = 1e-4
  seed: int = 0

  def __post_init__(self):
    def integer(v):
      return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

    for name in ("latent_channels", "downsample", "num_steps", "batch_size", "seed"):
      value = getattr(self, name)
      if not integer(value) or (name != "seed" and value < 1):
        raise ValueError(f"LatentConfig.{name} = {value!r}: expected an integer"
                         + ("" if name == "seed" else " >= 1"))
    if not isinstance(self.channels, (tuple, list)) or not all(integer(c)
                                                               for c in self.channels):
      raise ValueError(f"LatentConfig.channels = {self.channels!r}: expected a list of integers")
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
    for name, low in (("learning_rate", None), ("latent_penalty", 0.0)):
      value = getattr(self, name)
      ok = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value) and (value > 0 if low is None else value >= low))
      if not ok:
        raise ValueError(f"LatentConfig.{name} = {value!r}: expected a finite number "
                         + ("> 0" if low is None else ">= 0"))
    self.autoencoder((self.downsample, self.downsample, 1))  # the architecture's own checks

  def autoencoder(self, image_shape) -> AutoencoderConfig:
    """The ``AutoencoderConfig`` for images of ``image_shape`` (H, W, C)."""
    return AutoencoderConfig(image_shape=tuple(int(d) for d in image_shape),
                             latent_channels=self.latent_channels, downsample=self.downsample,
                             channels=self.channels)

  def latent_shape(self, image_shape) -> tuple[int, int, int]:
    """(H/f, W/f, latent_channels) for images of ``image_shape``."""
    return self.autoencoder(image_shape).latent_shape

  def fit(self, images, *, progress: Progress | None = None
          ) -> tuple[AutoencoderConfig, Params, np.ndarray]:
    """Trains the autoencoder on ``images`` [N, H, W, C]: ``(config, params, losses)``;
    ``autoencoder_space(config, params)`` is its space."""
    images = np.asarray(images, np.float32)
    config = self.autoencoder(images.shape[1:])
    params, losses = train_autoencoder(
        config, images, jax.random.key(self.seed), num_steps=self.num_steps,
        batch_size=self.batch_size, learning_rate=self.learning_rate,
        latent_penalty=self.latent_penalty, scaling=LATENT_SCALING, progress=progress)
    return config, params, losses

  def to_dict(self) -> dict:
    return {**dataclasses.asdict(self), "channels": list(self.channels)}


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flatten(v, name))
    else:
      out[name] = np.asarray(v)
  return out


def pack_autoencoder(config: AutoencoderConfig, params: Params, record: dict | None = None,
                     losses=None) -> dict[str, np.ndarray]:
  """An autoencoder as named numpy arrays, for one ``.npz`` (``np.savez(f, **packed)``):
  ``params/<path>`` (exact), ``losses`` and ``meta``, the JSON of the config and of
  ``record`` (what the caller needs to know it is the right one). ``unpack_autoencoder``
  reads it back."""
  doc = {"format": PACK_FORMAT, "config": dataclasses.asdict(config), "record": record or {}}
  return {"meta": np.asarray(json.dumps(doc, sort_keys=True)),
          "losses": np.asarray([] if losses is None else losses, np.float32),
          **{f"params/{k}": v for k, v in _flatten(params).items()}}


def unpack_autoencoder(arrays) -> tuple[AutoencoderConfig, Params, dict]:
  """``(config, params, record)`` from ``pack_autoencoder``'s arrays (or an open
  ``np.load`` of them).

  Raises:
    ValueError: they are not a packed autoencoder of this format.
  """
  names = list(getattr(arrays, "files", arrays))
  if "meta" not in names:
    raise ValueError("not a packed autoencoder (no meta array)")
  doc = json.loads(str(np.asarray(arrays["meta"])))
  if doc.get("format") != PACK_FORMAT:
    raise ValueError(f"packed autoencoder format {doc.get('format')}, expected {PACK_FORMAT}")
  params: dict = {}
  for name in names:
    if name.startswith("params/"):
      *path, leaf = name[len("params/"):].split("/")
      node = params
      for k in path:
        node = node.setdefault(k, {})
      node[leaf] = jnp.asarray(arrays[name])
  config = AutoencoderConfig(**doc["config"])
  jax.eval_shape(_fns(config).encode, params,  # checks the params against the config
                 jax.ShapeDtypeStruct((1,) + config.image_shape, jnp.float32))
  return config, params, doc["record"]
