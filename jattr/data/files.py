"""Loaders for the real image datasets kept in a data directory, and the name registry
(which also takes a path to your own data: ``dataset_source``, ``jattr.data.own``).

The files are not part of the package and are never read at import time: every
loader takes ``data_dir`` (the CLI's ``--data-dir``), falling back to the
``JATTR_DATA`` environment variable. The expected layout is

    <data_dir>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
    <data_dir>/cifar2_automobile_horse.npz
    <data_dir>/olivetti_faces.npz

Every loader validates what it reads (magic numbers, keys, shapes, dtypes, label
ranges) and names the offending file, so a truncated download fails here rather than
as a shape error deep inside training. Nothing is cached: each call reads the file.
"""

from __future__ import annotations

import difflib
import gzip
import os
import pathlib
from typing import Callable

import numpy as np

from jattr.data.dataset import Dataset
from jattr.data.digits import load_digits
from jattr.data.own import ARRAY_SUFFIXES, IMAGE_SUFFIXES, array_keys, load_arrays
# _CORRUPT: what numpy/zipfile/gzip raise on a file that is not what it claims.
from jattr.data.own import _CORRUPT, load_image_folder, open_npz, scan_image_folder

DATA_ENV = "JATTR_DATA"
"""Environment variable naming the data directory when no ``data_dir`` is passed."""

FASHION_MNIST_DIR = "fashion-mnist"
CIFAR2_FILE = "cifar2_automobile_horse.npz"
OLIVETTI_FILE = "olivetti_faces.npz"

# IDX magic numbers: two zero bytes, a type code (0x08 = unsigned byte), the rank.
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Finds the folder holding the real datasets.

  Args:
    data_dir: the folder, if the caller has one (the CLI's ``--data-dir``); ``None``
      falls back to ``$JATTR_DATA``.

  Returns:
    The folder as an absolute path.

  Raises:
    FileNotFoundError: neither ``data_dir`` nor ``$JATTR_DATA`` is set, or the folder
      does not exist or is not a directory.
  """
  if data_dir is not None:
    source = "the data_dir argument"
  elif os.environ.get(DATA_ENV):
    data_dir, source = os.environ[DATA_ENV], f"${DATA_ENV}"
  else:
    raise FileNotFoundError(
        f"no data directory given: pass --data-dir (data_dir=... in Python) or set "
        f"{DATA_ENV} to the folder holding the datasets (e.g. {DATA_ENV}=../shared/data "
        f"from the repository root); only 'digits' loads without one")
  path = pathlib.Path(data_dir).expanduser().absolute()
  if not path.is_dir():
    what = "is not a directory" if path.exists() else "does not exist"
    raise FileNotFoundError(
        f"data directory {path} (from {source}) {what}; expected a folder holding "
        f"{FASHION_MNIST_DIR}/, {CIFAR2_FILE} and {OLIVETTI_FILE}")
  return path


def _require_file(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.is_file():
    raise FileNotFoundError(f"{what} not found: expected the file {path}")
  return path


def _check_split(split: str, valid: tuple[str, ...], dataset: str) -> None:
  if split not in valid:
    raise ValueError(f"split for {dataset} must be one of {valid}, got {split!r}")


def _batch_shape(item_shape: tuple[int, ...]) -> str:
  """(28, 28) -> "(N, 28, 28)", () -> "(N,)", for error messages."""
  return "(N" + "".join(f", {d}" for d in item_shape) + (")" if item_shape else ",)")


def _to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 [-1, 1]; in place on the float copy to halve peak memory."""
  x = images.astype(np.float32)
  x /= 127.5
  x -= 1.0
  return x


def _check_labels(y: np.ndarray, num_classes: int, path: pathlib.Path) -> np.ndarray:
  if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
    raise ValueError(f"{path}: labels must lie in [0, {num_classes}), "
                     f"got values in [{int(y.min())}, {int(y.max())}]")
  return y.astype(np.int32)


# ---------------------------------------------------------------------------------
# Fashion-MNIST (gzipped IDX)
# ---------------------------------------------------------------------------------


def _read_idx(path: pathlib.Path, magic: int, item_shape: tuple[int, ...]) -> np.ndarray:
  """Parses a gzipped IDX file of unsigned bytes.

  Args:
    path: the ``.gz`` file.
    magic: the expected magic number (2051 for rank-3 images, 2049 for labels).
    item_shape: the expected shape of one item, () for labels, (28, 28) for images.

  Returns:
    uint8 array of shape [N, *item_shape].

  Raises:
    ValueError: the file is not gzip, the magic number or dims are not the expected
      ones, or the payload length does not match the header.
  """
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except _CORRUPT as e:
    raise ValueError(f"{path}: cannot decompress ({e}); expected a gzipped IDX file") from e
  if len(raw) < 4:
    raise ValueError(f"{path}: {len(raw)} bytes after decompression; expected an IDX "
                     f"header starting with magic number {magic}")
  got_magic = int.from_bytes(raw[:4], "big")
  if got_magic != magic:
    raise ValueError(f"{path}: IDX magic number {got_magic}; expected {magic} "
                     f"(unsigned bytes, rank {1 + len(item_shape)})")
  rank = magic & 0xFF
  header = 4 + 4 * rank
  if len(raw) < header:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes); expected "
                     f"{header} bytes for rank {rank}")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=rank, offset=4))
  if dims[1:] != item_shape:
    raise ValueError(f"{path}: IDX dims {dims}; expected {_batch_shape(item_shape)}")
  payload = len(raw) - header
  if payload != int(np.prod(dims)):
    raise ValueError(f"{path}: IDX payload of {payload} bytes; expected "
                     f"{int(np.prod(dims))} for dims {dims}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None,
                       split: str = "train") -> Dataset:
  """Loads Fashion-MNIST from its four standard IDX files.

  Args:
    data_dir: the data directory (see ``resolve_data_dir``); the files are read from
      its ``fashion-mnist/`` folder.
    split: ``"train"`` (60000 images, ``train-*``) or ``"test"`` (10000, ``t10k-*``).

  Returns:
    A ``Dataset`` named ``"fashion_mnist"`` with ``x`` float32 [N, 28, 28, 1] in
    [-1, 1] (``x / 127.5 - 1``) and ``y`` int32 [N], the clothing class 0..9.
  """
  _check_split(split, ("train", "test"), "fashion_mnist")
  folder = resolve_data_dir(data_dir) / FASHION_MNIST_DIR
  prefix = "train" if split == "train" else "t10k"
  images_path = _require_file(folder / f"{prefix}-images-idx3-ubyte.gz",
                              f"Fashion-MNIST {split} images (gzipped IDX)")
  labels_path = _require_file(folder / f"{prefix}-labels-idx1-ubyte.gz",
                              f"Fashion-MNIST {split} labels (gzipped IDX)")
  images = _read_idx(images_path, _IDX_IMAGES_MAGIC, (28, 28))
  labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, ())
  if len(images) != len(labels):
    raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                     f"{len(labels)} labels; expected one label per image")
  return Dataset(x=_to_unit_range(images)[..., None],
                 y=_check_labels(labels, 10, labels_path), name="fashion_mnist")


# ---------------------------------------------------------------------------------
# npz files (CIFAR-2, Olivetti)
# ---------------------------------------------------------------------------------


def _read_npz_pair(path: pathlib.Path, x_key: str, y_key: str,
                   item_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks images ``x_key`` uint8 [N, *item_shape] and labels ``y_key`` [N].

  Only the two requested members are decompressed, so the CIFAR-2 test split does not
  pay for the training images.
  """
  expected_x = f"{_batch_shape(item_shape)} uint8"
  npz = open_npz(path, f"{x_key!r} {expected_x} and {y_key!r} (N,) integers")
  with npz:
    for key in (x_key, y_key):
      if key not in npz.files:
        raise ValueError(f"{path}: missing key {key!r}; found {sorted(npz.files)}, expected "
                         f"{x_key!r} {expected_x} and {y_key!r} (N,) integers")
    try:
      x, y = npz[x_key], npz[y_key]
    except _CORRUPT as e:
      raise ValueError(f"{path}: cannot read {x_key!r}/{y_key!r} ({e})") from e
  if x.ndim != 1 + len(item_shape) or x.shape[1:] != item_shape or x.dtype != np.uint8:
    raise ValueError(f"{path}: {x_key!r} has shape {x.shape} dtype {x.dtype}; "
                     f"expected {expected_x}")
  if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{path}: {y_key!r} has shape {y.shape} dtype {y.dtype}; expected "
                     f"({x.shape[0]},) integers, one label per image in {x_key!r}")
  return x, y


def load_cifar2(data_dir: str | os.PathLike | None = None, split: str = "train") -> Dataset:
  """Loads CIFAR-2: the automobile and horse classes of CIFAR-10.

  The file holds all 10000 training images of the two classes; the papers' protocol
  (D-TRAK, K-FAC influence) trains on 5000 of them, drawn with
  ``subsets.random_subset`` or ``subsets.per_class``. Both splits are stored sorted
  by label (all automobiles, then all horses).

  Args:
    data_dir: the data directory (see ``resolve_data_dir``); reads
      ``cifar2_automobile_horse.npz`` from it.
    split: ``"train"`` (10000 images) or ``"test"`` (2000).

  Returns:
    A ``Dataset`` named ``"cifar2"`` with ``x`` float32 [N, 32, 32, 3] in [-1, 1]
    (``x / 127.5 - 1``) and ``y`` int32 [N], 0 = automobile, 1 = horse.
  """
  _check_split(split, ("train", "test"), "cifar2")
  path = _require_file(resolve_data_dir(data_dir) / CIFAR2_FILE,
                       "CIFAR-2 archive (x_train/y_train/x_test/y_test)")
  x, y = _read_npz_pair(path, f"x_{split}", f"y_{split}", (32, 32, 3))
  return Dataset(x=_to_unit_range(x), y=_check_labels(y, 2, path), name="cifar2")


def load_olivetti(data_dir: str | os.PathLike | None = None, split: str = "all") -> Dataset:
  """Loads the 400 AT&T/Olivetti faces (40 people, 10 images each).

  The set has no canonical train/test split, so ``"train"`` and ``"all"`` both return
  all 400 images, sorted by person; hold examples out with ``subsets.split_indices`` or
  ``subsets.per_class``.

  Args:
    data_dir: the data directory (see ``resolve_data_dir``); reads
      ``olivetti_faces.npz`` from it.
    split: ``"all"`` or ``"train"`` (the same 400 images).

  Returns:
    A ``Dataset`` named ``"olivetti"`` with ``x`` float32 [400, 64, 64, 1] in [-1, 1]
    (``x / 127.5 - 1``) and ``y`` int32 [400], the person id 0..39.
  """
  _check_split(split, ("all", "train"), "olivetti")
  path = _require_file(resolve_data_dir(data_dir) / OLIVETTI_FILE,
                       "Olivetti faces archive (x/y)")
  x, y = _read_npz_pair(path, "x", "y", (64, 64))
  return Dataset(x=_to_unit_range(x)[..., None], y=_check_labels(y, 40, path),
                 name="olivetti")


# ---------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------


def _load_digits(data_dir, split: str) -> Dataset:
  del data_dir  # embedded in scikit-learn; callers may pass one uniformly
  _check_split(split, ("all", "train"), "digits")
  return load_digits()


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": _load_digits,
    "fashion_mnist": load_fashion_mnist,
    "cifar2": load_cifar2,
    "olivetti": load_olivetti,
}

DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)
"""The built-in names ``load_dataset`` accepts (it also takes a path: ``dataset_source``)."""

SPLIT_FOLDERS = ("train", "test")
"""Sub-folders that make an image folder a two-split one (both must exist)."""


def dataset_source(name: str) -> tuple[str, pathlib.Path | None]:
  """How ``load_dataset`` reads ``name``: a built-in name, or a path to your own data.

  The rule: a name of ``DATASET_NAMES`` is the built-in dataset (so a folder called
  ``digits`` must be given as ``./digits``); otherwise ``name`` is a path (``~``
  expanded, relative to the current directory; ``data_dir`` plays no part): an
  existing folder is an image folder (``load_image_folder``), an existing ``.npz`` or
  ``.npy`` file an array file (``load_arrays``).

  Returns:
    ``("builtin", None)``, ``("folder", path)`` or ``("arrays", path)``.

  Raises:
    ValueError: ``name`` is neither a built-in name nor an existing folder, ``.npz`` or
      ``.npy`` file; the message says which and suggests the nearest name.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"dataset must be a non-empty string, got {name!r}")
  if name in _LOADERS:
    return "builtin", None
  path = pathlib.Path(name).expanduser()
  try:
    is_dir, is_file = path.is_dir(), path.is_file()
  except (OSError, ValueError):  # a name too long for a path, or with a NUL byte
    is_dir = is_file = False
  if is_dir:
    return "folder", path
  if is_file:
    if path.suffix.lower() in ARRAY_SUFFIXES:
      return "arrays", path
    raise ValueError(f"{path} is a file but not an .npz or .npy file; expected a dataset "
                     f"name ({', '.join(map(repr, DATASET_NAMES))}), a folder of "
                     f"{'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images or an "
                     f".npz/.npy file")
  match = difflib.get_close_matches(name, DATASET_NAMES, n=1, cutoff=0.6)
  raise ValueError(f"no dataset named {name!r} and no such file or folder "
                   f"({path.absolute()}); expected one of "
                   f"{', '.join(map(repr, DATASET_NAMES))}, or the path of a folder of "
                   f"{'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images or of an "
                   f".npz/.npy file" + (f" (did you mean {match[0]!r}?)" if match else ""))


def _load_own_folder(name: str, root: pathlib.Path, split: str) -> Dataset:
  splits = all((root / s).is_dir() for s in SPLIT_FOLDERS)
  if not splits:
    _check_own_split(split, ("all", "train"), name,
                     f"it has no {'/ and '.join(SPLIT_FOLDERS)}/ sub-folders")
    return load_image_folder(root, name=name)
  _check_split(split, SPLIT_FOLDERS, name)
  # Both splits number the classes of the train split, so a label means one class.
  classes = scan_image_folder(root / "train").class_names
  return load_image_folder(root / split, classes=classes, name=name)


def _load_own_arrays(name: str, path: pathlib.Path, split: str) -> Dataset:
  keys = array_keys(path)
  if "x_test" not in keys:
    _check_own_split(split, ("all", "train"), name, "it has no 'x_test' key")
    if "x" not in keys and "x_train" in keys:
      return load_arrays(path, x_key="x_train", y_key="y_train" if "y_train" in keys else None,
                         name=name)
    return load_arrays(path, name=name)
  _check_split(split, ("train", "test"), name)
  if split == "test":
    return load_arrays(path, x_key="x_test", y_key="y_test" if "y_test" in keys else None,
                       name=name)
  if "x" in keys:
    return load_arrays(path, name=name)
  return load_arrays(path, x_key="x_train", y_key="y_train" if "y_train" in keys else None,
                     name=name)


def _check_own_split(split: str, valid: tuple[str, ...], name: str, why: str) -> None:
  if split not in valid:
    raise ValueError(f"split for {name} must be one of {valid}, got {split!r}: {why}, so it "
                     f"is a single split ('train' and 'all' both give all of it); hold "
                     f"queries out with split_indices or a training subset (num_train)")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 split: str = "train") -> Dataset:
  """Loads a dataset by name, or your own data by path.

  Args:
    name: one of ``DATASET_NAMES``: ``"digits"`` (embedded, ignores ``data_dir``),
      ``"fashion_mnist"``, ``"cifar2"``, ``"olivetti"``; or a path (see
      ``dataset_source``): a folder of images, read by ``load_image_folder`` with its
      defaults (labels ``"auto"``: ``labels.csv``, else sub-folders, else none), or
      an ``.npz``/``.npy`` file read by ``load_arrays`` with its defaults.
    data_dir: the data directory for the file-backed datasets (see
      ``resolve_data_dir``); not used for a path.
    split: ``"train"`` or ``"test"`` for fashion_mnist and cifar2; digits and olivetti
      have no test split and accept ``"train"`` or ``"all"`` (the whole set). Your own
      data is one split (``"train"`` or ``"all"``) unless a folder has both ``train/``
      and ``test/`` sub-folders (each then a folder as above, labelled with the train
      split's class names) or an ``.npz`` has an ``x_test`` key (``"train"``: ``x``,
      else ``x_train``, with ``y`` / ``y_train`` if present; ``"test"``: ``x_test``,
      ``y_test``).

  Returns:
    The ``Dataset``, images float32 [N, H, W, C] in [-1, 1], labels int32 [N]; its
    ``name`` is ``name`` as given.

  Raises:
    ValueError: an unknown name that is no path either, a split the data does not
      have, or a file that is not what it should be (named in the message).
    FileNotFoundError: a missing data directory or file of a built-in dataset.
  """
  kind, path = dataset_source(name)
  if kind == "folder":
    return _load_own_folder(name, path, split)
  if kind == "arrays":
    return _load_own_arrays(name, path, split)
  return _LOADERS[name](data_dir, split)
