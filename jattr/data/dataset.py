"""The in-memory image dataset every loader returns and every subset function takes.

A ``Dataset`` is plain numpy on the host: loaders read files, subset functions index
arrays, and moving a batch to the device is the caller's decision (see STYLE.md:
disk and devices live at the edges).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """Images and integer labels, scaled for diffusion training.

  Attributes:
    x: float32 images in [-1, 1], shape [N, H, W, C].
    y: int32 class labels, shape [N] (the digit for ``digits``, the clothing class for
      ``fashion_mnist``, 0 = automobile / 1 = horse for ``cifar2``, the person id for
      ``olivetti``; for your own data the sub-folder, CSV or array labels, 0 when it has
      none).
    name: the registry name the data came from (a key of ``load_dataset``), or for
      your own data the path it was loaded from, as given; subsets keep their parent's
      name. Class names of your own data are not kept here: see
      ``jattr.data.scan_image_folder`` (label i is its ``class_names[i]``).
  """

  x: np.ndarray
  y: np.ndarray
  name: str

  @property
  def shape(self) -> tuple[int, int, int]:
    """The shape of one image, (H, W, C)."""
    return tuple(int(d) for d in self.x.shape[1:])

  def __len__(self) -> int:
    """The number of examples N (not the number of fields)."""
    return int(self.x.shape[0])


def _make(cls, iterable):
  result = tuple.__new__(cls, iterable)
  if tuple.__len__(result) != len(cls._fields):
    raise TypeError(f"Dataset takes {len(cls._fields)} fields {cls._fields}, "
                    f"got {tuple.__len__(result)}")
  return result


# namedtuple's own _make (used by _replace) checks the field count with len(), which
# the __len__ above turns into the number of examples; check the tuple length instead.
# typing.NamedTuple forbids defining _make in the class body, hence the assignment.
Dataset._make = classmethod(_make)
