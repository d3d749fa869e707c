"""Latent diffusion: a diffusion model trained on z = encode(x) instead of on x.

Many diffusion models (Stable Diffusion, Rombach et al. 2022) run in the latent space
of a fixed autoencoder: a training image x [H, W, C] is encoded once to a latent
z = E(x) [h, w, c], the diffusion model learns the distribution of the latents, and a
sample z₀ is decoded to an image x = D(z₀). Everything in jattr is shape-generic
(images are [N, H, W, C] floats, any C), so a latent diffusion model is simply a
diffusion model whose "images" are latents: training, sampling, measurements,
features, curvature and scores all run on z unchanged.

A ``LatentSpace`` is that pair of maps as two user functions of arrays only,

    encode(x [B, H, W, C]) -> z [B, h, w, c]        decode(z [B, h, w, c]) -> x [B, H, W, C]

with any parameters closed over (``functools.partial(encode_fn, params)``), e.g.
``jattr.models.autoencoder_space(config, params)`` for jattr's small autoencoder and
``identity_space(image_shape)`` for pixel space. Example i of each output must
depend on example i of the input only (no batch statistics): the batched helpers
below pad the last batch and rely on that.

What latent attribution attributes. The encoder is fixed, not trained with the
diffusion model: the training examples the diffusion model sees are the latents
z_i = E(x_i) of the training images, and every gradient jattr takes is with respect
to the diffusion parameters θ only,

    φ_i = Pᵀ ∇_θ f(θ; z_i),        z_i = E(x_i)  (a constant: no gradient flows into E),

so a score τ(q, i) says how much training image i, *through its latent*, made the
diffusion model produce the latent q. It attributes the diffusion model, not the
autoencoder: the autoencoder may itself have been trained on these images (or on
others), and that influence is not measured. A generated image is attributed through
its latent: score the sampled latent z₀ itself, or the re-encoding E(D(z₀)) of
its decoded image, which is not z₀ exactly (D and E are inverses only up to the
reconstruction error). With ``identity_space`` the latents are the images and latent
attribution is pixel attribution, bit for bit (``tests/latent_test.py``).

Scale. jattr's noise schedules are designed for data of roughly unit scale (images in
[−1, 1]), so latents are scaled too: Stable Diffusion multiplies its VAE latents by
0.18215 ≈ 1/std so that they have unit variance, and ``jattr.models.train_autoencoder``
folds the same kind of factor into ``encode``/``decode``. Note that
``jattr.train.train`` checks that training data lie in [−1, 1] and the samplers'
``clip_x0`` clips x̂₀ to [−1, 1]: train on unit-variance latents (values beyond ±1)
with your own loop on ``jattr.diffusion.batch_loss`` and sample with
``clip_x0=False``, or scale the latents into [−1, 1] (``train_autoencoder(...,
scaling="max")``), for which both hold.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattr.data.dataset import Dataset
from jattr.diffusion.checks import check_float_images

ArrayFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """A fixed encoder/decoder pair: the space a latent diffusion model lives in.

  Attributes:
    encode: ``encode(x [B, H, W, C]) -> z [B, h, w, c]``, a function of arrays only
      (parameters closed over); pure, so it may be jitted.
    decode: ``decode(z [B, h, w, c]) -> x [B, H, W, C]``, the same kind of function.
      ``decode(encode(x))`` must have the shape of ``x`` (checked by
      ``check_space``, which ``encode_images`` and ``decode_latents`` call once per
      call, from shapes only).
    image_shape: (H, W, C) of the images, or None for any; when given, every image
      batch is checked against it.
  """

  encode: ArrayFn
  decode: ArrayFn
  image_shape: tuple[int, int, int] | None = None

  def __post_init__(self):
    if not callable(self.encode) or not callable(self.decode):
      raise TypeError(f"LatentSpace needs callable encode and decode, got "
                      f"{type(self.encode).__name__} and {type(self.decode).__name__}")
    if self.image_shape is not None:
      shape = tuple(int(d) for d in self.image_shape)
      if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (H, W, C) with positive entries, got "
                         f"{self.image_shape}")
      object.__setattr__(self, "image_shape", shape)


def _identity(x: jax.Array) -> jax.Array:
  return x


def identity_space(image_shape: tuple[int, int, int]) -> LatentSpace:
  """Pixel space as a latent space: ``encode`` and ``decode`` return their input.

  Latent diffusion in it is pixel diffusion: ``encode_images`` returns the images
  themselves (as float32) and ``latent_dataset`` the same dataset.
  """
  return LatentSpace(_identity, _identity, tuple(image_shape))


def _shape_struct(shape: tuple[int, ...], dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(d) for d in shape), dtype)


def _eval(fn: ArrayFn, arg: jax.ShapeDtypeStruct, what: str) -> jax.ShapeDtypeStruct:
  try:
    out = jax.eval_shape(fn, arg)
  except Exception as err:  # any failure of the user's function: name the call
    raise ValueError(f"the space's {what} fails on a batch of shape {arg.shape}: "
                     f"{type(err).__name__}: {err}") from err
  if not isinstance(out, jax.ShapeDtypeStruct):
    raise ValueError(f"the space's {what} must return one array, got {type(out).__name__}")
  return out


def check_space(space: LatentSpace, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
  """Checks the space on images of ``image_shape`` (H, W, C), from shapes only.

  ``encode`` must map a batch [B, H, W, C] to a floating batch [B, h, w, c] and
  ``decode`` must map that back to [B, H, W, C] (``jax.eval_shape``: nothing is
  computed).

  Returns:
    The latent shape (h, w, c).

  Raises:
    TypeError: ``space`` is not a ``LatentSpace``.
    ValueError: on any other shape, with the shapes found.
  """
  if not isinstance(space, LatentSpace):
    raise TypeError(f"space must be a jattr.diffusion.latent.LatentSpace, got "
                    f"{type(space).__name__}")
  image_shape = tuple(int(d) for d in image_shape)
  if space.image_shape is not None and image_shape != space.image_shape:
    raise ValueError(f"the space is for images of shape {space.image_shape}, got images of "
                     f"shape {image_shape}")
  batch = 2  # not 1, so that a function squeezing the batch axis is caught
  x = _shape_struct((batch,) + image_shape)
  z = _eval(space.encode, x, "encode")
  if len(z.shape) != 4 or z.shape[0] != batch:
    raise ValueError(f"encode must map images [B, H, W, C] to latents [B, h, w, c], got "
                     f"{x.shape} -> {z.shape}")
  if not jnp.issubdtype(z.dtype, jnp.floating):
    raise ValueError(f"encode must return floating-point latents, got dtype {z.dtype}")
  back = _eval(space.decode, _shape_struct(z.shape, z.dtype), "decode")
  if back.shape != x.shape:
    raise ValueError(f"decode(encode(x)) must have the shape of x: x {x.shape} -> z "
                     f"{z.shape} -> {back.shape}")
  return tuple(int(d) for d in z.shape[1:])


def _map_batches(fn: ArrayFn, a: np.ndarray, batch_size: int, out_shape: tuple[int, ...]
                 ) -> np.ndarray:
  """fn over ``a`` in batches of ``batch_size`` (the last one padded), as float32 numpy."""
  batch_size = int(batch_size)
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  n = a.shape[0]
  out = np.empty((n,) + tuple(out_shape), np.float32)
  size = min(batch_size, n)  # every call sees this one shape: a jitted fn compiles once
  for start in range(0, n, size):
    chunk = a[start:start + size]
    count = chunk.shape[0]
    if count < size:  # pad with copies of the last row; examples are independent
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - count, axis=0)])
    result = np.asarray(fn(jnp.asarray(chunk)))
    if result.shape != (size,) + tuple(out_shape):
      raise ValueError(f"the space's function returned shape {result.shape} on a batch of "
                       f"shape {chunk.shape}; its shape check promised "
                       f"{(size,) + tuple(out_shape)}")
    out[start:start + count] = result[:count]
  return out


def _as_batch(a, name: str) -> np.ndarray:
  check_float_images(a, name)
  a = np.asarray(a, np.float32)
  if a.ndim != 4:
    raise ValueError(f"{name} must be a batch [N, H, W, C], got shape {a.shape}")
  return a


def encode_images(space: LatentSpace, x, batch_size: int = 256) -> np.ndarray:
  """z = encode(x), batch by batch on the host.

  Args:
    space: the latent space.
    x: float images [N, H, W, C] (numpy or jax).
    batch_size: images encoded at once; the last batch is padded to this size, so a
      jitted ``encode`` compiles once.

  Returns:
    The latents, float32 numpy [N, h, w, c].

  Raises:
    ValueError: ``x`` is not a float batch [N, H, W, C] of the space's image shape, or
      the space's shapes do not check (``check_space``).
  """
  x = _as_batch(x, "x")
  latent_shape = check_space(space, x.shape[1:])
  if x.shape[0] == 0:
    return np.zeros((0,) + latent_shape, np.float32)
  return _map_batches(space.encode, x, batch_size, latent_shape)


def decode_latents(space: LatentSpace, z, batch_size: int = 256, *,
                   image_shape: tuple[int, int, int] | None = None) -> np.ndarray:
  """x = clip(decode(z), −1, 1), batch by batch on the host.

  Args:
    space: the latent space.
    z: float latents [N, h, w, c].
    batch_size: latents decoded at once (the last batch padded, as in
      ``encode_images``).
    image_shape: (H, W, C) of the decoded images, for the shape check; defaults to the
      space's ``image_shape``, else to what ``decode`` returns.

  Returns:
    The images, float32 numpy [N, H, W, C], clipped to [−1, 1] (jattr's image range;
    a decoder's output may overshoot it).

  Raises:
    ValueError: ``z`` is not a float batch [N, h, w, c], or ``decode`` does not return
      images [N, H, W, C] that ``encode`` maps back to latents of z's shape.
  """
  z = _as_batch(z, "z")
  image_shape = image_shape if image_shape is not None else space.image_shape
  if image_shape is None:
    if not isinstance(space, LatentSpace):
      raise TypeError(f"space must be a jattr.diffusion.latent.LatentSpace, got "
                      f"{type(space).__name__}")
    out = _eval(space.decode, _shape_struct((2,) + z.shape[1:]), "decode")
    if len(out.shape) != 4 or out.shape[0] != 2:
      raise ValueError(f"decode must map latents [B, h, w, c] to images [B, H, W, C], got "
                       f"{(2,) + z.shape[1:]} -> {out.shape}")
    image_shape = out.shape[1:]
  latent_shape = check_space(space, image_shape)
  if z.shape[1:] != latent_shape:
    raise ValueError(f"z must be latents [N, {', '.join(map(str, latent_shape))}] of this "
                     f"space (images {tuple(image_shape)}), got shape {z.shape}")
  if z.shape[0] == 0:
    return np.zeros((0,) + tuple(image_shape), np.float32)
  return np.clip(_map_batches(space.decode, z, batch_size, tuple(image_shape)), -1.0, 1.0)


def latent_dataset(space: LatentSpace, ds: Dataset, batch_size: int = 256) -> Dataset:
  """The dataset of the latents of ``ds``'s images: ``Dataset(encode(ds.x), ds.y,
  ds.name)``.

  The labels and the name are kept, so subsets (``jattr.data.take``, ``split_indices``
  positions) and conditional training carry over. The ``x`` of the result holds
  latents [N, h, w, c], not images: their range is the space's (unit variance for
  ``train_autoencoder``'s default ``scaling="std"``), not necessarily [−1, 1].
  """
  if not isinstance(ds, Dataset):
    raise TypeError(f"ds must be a jattr.data.Dataset, got {type(ds).__name__}")
  return Dataset(x=encode_images(space, ds.x, batch_size), y=np.asarray(ds.y).copy(),
                 name=ds.name)
