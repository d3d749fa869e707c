"""scikit-learn's 8x8 handwritten digits: the embedded default dataset.

It ships inside the scikit-learn wheel, so tests, examples and the CLI default run
with no data directory.
"""

from __future__ import annotations

import numpy as np
import sklearn.datasets

from jattr.data.dataset import Dataset


def load_digits() -> Dataset:
  """Loads the 1797 scikit-learn digits as 8x8 grayscale images.

  Pixels are integers 0..16 (counts of set pixels in 4x4 blocks of the original
  32x32 bitmaps), mapped to [-1, 1] by ``x / 8 - 1``.

  Returns:
    A ``Dataset`` named ``"digits"`` with ``x`` float32 [1797, 8, 8, 1] in [-1, 1] and
    ``y`` int32 [1797], the digit 0..9.
  """
  bunch = sklearn.datasets.load_digits()
  x = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]
  return Dataset(x=x, y=bunch.target.astype(np.int32), name="digits")
