"""Image grids as PNG files (Pillow)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from jattr.io import atomic


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats → uint8 [0, 255] (values outside are clipped)."""
  x = np.asarray(images, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images, ncol: int | None = None, pad: int = 1, scale: int = 1,
         pad_value: int = 255) -> np.ndarray:
  """Tiles [N, H, W, C] images in [-1, 1] into one uint8 [rows·H', cols·W', C] array.

  Args:
    images: the images, float in [-1, 1].
    ncol: images per row (default: ⌈√N⌉).
    pad: pixels of ``pad_value`` between tiles (after scaling).
    scale: integer nearest-neighbour upscaling of each tile (8×8 digits need it).
    pad_value: the grey level of the padding.
  """
  x = to_uint8(images)
  if x.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {x.shape}")
  n, h, w, c = x.shape
  if scale > 1:
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
  ncol = ncol or int(np.ceil(np.sqrt(n)))
  nrow = int(np.ceil(n / ncol))
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
  return out


def save_image(image: Image.Image, path: str | os.PathLike) -> str:
  """Writes a PIL image as a PNG, atomically (``jattr.io.atomic``); returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  atomic.write_bytes(path, lambda f: image.save(f, format="PNG"))
  return os.fspath(path)


def save_png(array: np.ndarray, path: str | os.PathLike) -> str:
  """Writes a uint8 [H, W, C] (C = 1 or 3) array as a PNG; returns the path."""
  a = np.asarray(array)
  return save_image(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a), path)


def save_grid(images, path: str | os.PathLike, **kwargs) -> str:
  """``save_png(grid(images, **kwargs), path)``."""
  return save_png(grid(images, **kwargs), path)
