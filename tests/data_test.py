"""Tests for jattr.data: loaders (embedded and real files), file validation, subsets.

Every loader's format handling and error path runs always, on tiny files written into
``tmp_path`` in the real formats (gzipped IDX for Fashion-MNIST, deflated .npz for
CIFAR-2 and Olivetti, uint8 images and labels). The checks on the real files take the
``shared_data_dir`` fixture (tests/conftest.py): skipped with the reason where the
shared datasets are absent, failed where they are absent under ``CI=true``.
"""

import gzip
import pathlib
import re
import zipfile

import conftest  # tests/ is on sys.path, as for toy_models
import numpy as np
import pytest

from jattr import data

# ---------------------------------------------------------------------------------
# Helpers: tiny data dirs in the real files' formats
# ---------------------------------------------------------------------------------

_FASHION = {"train": "train", "test": "t10k"}  # split -> file prefix


def _write_idx(path: pathlib.Path, magic: int, dims: tuple[int, ...], payload: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
  with gzip.open(path, "wb") as f:
    f.write(header + payload)


def _ramp(shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
  """uint8 images holding every value 0..255 (when large enough), distinct per offset."""
  return ((np.arange(np.prod(shape), dtype=np.int64) + offset) % 256).astype(np.uint8).reshape(
      shape)


def _fake_fashion(root: pathlib.Path, n: int = 3, split: str = "train",
                  offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Writes the split's two IDX files with n images; returns (images [n, 28, 28], labels)."""
  prefix = _FASHION[split]
  images = _ramp((n, 28, 28), offset)
  labels = (np.arange(n) % 10).astype(np.uint8)
  _write_idx(root / "fashion-mnist" / f"{prefix}-images-idx3-ubyte.gz", 2051, (n, 28, 28),
             images.tobytes())
  _write_idx(root / "fashion-mnist" / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,),
             labels.tobytes())
  return images, labels


def _cifar2_arrays() -> dict[str, np.ndarray]:
  return {"x_train": _ramp((4, 32, 32, 3)), "y_train": np.array([0, 0, 1, 1], np.uint8),
          "x_test": _ramp((2, 32, 32, 3), offset=7), "y_test": np.array([1, 0], np.uint8)}


def _fake_cifar2(root: pathlib.Path, **overrides) -> pathlib.Path:
  """Writes cifar2_automobile_horse.npz; an override of None drops that key."""
  arrays = {**_cifar2_arrays(), **overrides}
  path = root / "cifar2_automobile_horse.npz"
  root.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


def _olivetti_arrays() -> dict[str, np.ndarray]:
  # 40 people, one 64x64 face each (the real file has ten each).
  return {"x": _ramp((40, 64, 64), offset=3), "y": np.arange(40, dtype=np.uint8)}


def _fake_olivetti(root: pathlib.Path, **overrides) -> pathlib.Path:
  """Writes olivetti_faces.npz; an override of None drops that key."""
  arrays = {**_olivetti_arrays(), **overrides}
  path = root / "olivetti_faces.npz"
  root.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


def _toy(n_per_class=(5, 3, 4)) -> data.Dataset:
  y = np.concatenate([np.full(k, c, np.int32) for c, k in enumerate(n_per_class)])
  x = np.linspace(-1, 1, len(y) * 4 * 4, dtype=np.float32).reshape(len(y), 4, 4, 1)
  return data.Dataset(x=x, y=y, name="toy")


def _check_scaled(ds: data.Dataset, n: int, shape: tuple[int, int, int], num_classes: int):
  assert ds.x.shape == (n, *shape) and ds.x.dtype == np.float32
  assert ds.y.shape == (n,) and ds.y.dtype == np.int32
  assert len(ds) == n and ds.shape == shape
  assert ds.x.min() >= -1.0 and ds.x.max() <= 1.0
  assert ds.x.min() < -0.9 and ds.x.max() > 0.5  # scaled, not left in [0, 1] or 0..255
  np.testing.assert_array_equal(np.unique(ds.y), np.arange(num_classes))


def _check_exact(ds: data.Dataset, images: np.ndarray, labels: np.ndarray):
  """x is images / 127.5 - 1 (0 -> -1, 255 -> 1) and y the labels, as int32."""
  np.testing.assert_allclose(ds.x.reshape(images.shape), images / 127.5 - 1, atol=1e-6)
  assert ds.x.min() == -1.0 and ds.x.max() == 1.0
  np.testing.assert_array_equal(ds.y, labels)


def _message(info: pytest.ExceptionInfo) -> str:
  return str(info.value)


# ---------------------------------------------------------------------------------
# Dataset and digits
# ---------------------------------------------------------------------------------


def test_digits_shape_range_and_labels():
  ds = data.load_digits()
  _check_scaled(ds, 1797, (8, 8, 1), 10)
  assert ds.name == "digits"
  # x / 8 - 1 on integers 0..16: every pixel is a multiple of 1/8, ends included.
  np.testing.assert_array_equal(ds.x * 8, np.round(ds.x * 8))
  assert ds.x.min() == -1.0 and ds.x.max() == 1.0


def test_dataset_len_is_examples_and_replace_still_works():
  ds = _toy()
  assert len(ds) == 12 and ds.shape == (4, 4, 1)
  x, y, name = ds  # still a 3-field tuple
  assert name == "toy"
  renamed = ds._replace(name="other")
  assert renamed.name == "other" and renamed.x is ds.x


# ---------------------------------------------------------------------------------
# Loaders on tiny files in the real formats (always run)
# ---------------------------------------------------------------------------------


def test_fashion_mnist_reads_each_split_from_its_own_files(tmp_path):
  train_x, train_y = _fake_fashion(tmp_path, n=10, split="train")
  test_x, test_y = _fake_fashion(tmp_path, n=12, split="test", offset=5)
  for split, images, labels in [("train", train_x, train_y), ("test", test_x, test_y)]:
    ds = data.load_fashion_mnist(tmp_path, split)
    _check_scaled(ds, len(images), (28, 28, 1), 10)
    _check_exact(ds, images, labels)
    assert ds.name == "fashion_mnist"
  assert data.load_fashion_mnist(tmp_path).x.shape == (10, 28, 28, 1)  # default: train


def test_cifar2_reads_each_split_from_its_own_keys(tmp_path):
  _fake_cifar2(tmp_path)
  arrays = _cifar2_arrays()
  for split, n in [("train", 4), ("test", 2)]:
    ds = data.load_cifar2(tmp_path, split)
    _check_scaled(ds, n, (32, 32, 3), 2)
    _check_exact(ds, arrays[f"x_{split}"], arrays[f"y_{split}"])
    assert ds.name == "cifar2"
  assert len(data.load_cifar2(tmp_path)) == 4  # default: train


def test_cifar2_test_split_needs_no_training_keys(tmp_path):
  _fake_cifar2(tmp_path, x_train=None, y_train=None)
  assert len(data.load_cifar2(tmp_path, "test")) == 2


def test_olivetti_all_and_train_are_the_same_faces(tmp_path):
  _fake_olivetti(tmp_path)
  arrays = _olivetti_arrays()
  ds = data.load_olivetti(tmp_path)  # default: all
  _check_scaled(ds, 40, (64, 64, 1), 40)
  _check_exact(ds, arrays["x"], arrays["y"])
  assert ds.name == "olivetti"
  train = data.load_olivetti(tmp_path, "train")
  np.testing.assert_array_equal(train.x, ds.x)
  np.testing.assert_array_equal(train.y, ds.y)


def test_labels_stored_as_wider_integers_are_accepted(tmp_path):
  _fake_cifar2(tmp_path, y_train=np.array([0, 0, 1, 1], np.int64))
  ds = data.load_cifar2(tmp_path)
  assert ds.y.dtype == np.int32
  np.testing.assert_array_equal(ds.y, [0, 0, 1, 1])


def test_load_dataset_dispatches_by_name_and_split(tmp_path):
  assert set(data.DATASET_NAMES) == {"digits", "fashion_mnist", "cifar2", "olivetti"}
  _fake_fashion(tmp_path, n=10, split="train")
  _fake_fashion(tmp_path, n=12, split="test")
  _fake_cifar2(tmp_path)
  _fake_olivetti(tmp_path)
  expected = {("fashion_mnist", "train"): 10, ("fashion_mnist", "test"): 12,
              ("cifar2", "train"): 4, ("cifar2", "test"): 2,
              ("olivetti", "train"): 40, ("olivetti", "all"): 40,
              ("digits", "train"): 1797, ("digits", "all"): 1797}
  for (name, split), n in expected.items():
    ds = data.load_dataset(name, tmp_path, split)
    assert ds.name == name and len(ds) == n, (name, split)
  assert len(data.load_dataset("cifar2", tmp_path)) == 4  # default split: train
  # digits is embedded: it ignores data_dir and needs no $JATTR_DATA.
  assert len(data.load_dataset("digits", data_dir="/nonexistent")) == 1797
  with pytest.raises(ValueError, match=r"'celeba'.*digits.*fashion_mnist.*cifar2.*olivetti"):
    data.load_dataset("celeba", tmp_path)


@pytest.mark.parametrize("name, split, valid", [
    ("cifar2", "val", "('train', 'test')"), ("fashion_mnist", "all", "('train', 'test')"),
    ("olivetti", "test", "('all', 'train')"), ("digits", "test", "('all', 'train')"),
    ("cifar2", "Train", "('train', 'test')")])
def test_unknown_split_names_the_split(tmp_path, name, split, valid):
  with pytest.raises(ValueError, match=f"split for {name}.*{re.escape(valid)}.*'{split}'"):
    data.load_dataset(name, tmp_path, split)


# ---------------------------------------------------------------------------------
# Data dir rule and missing files
# ---------------------------------------------------------------------------------


def test_data_dir_argument_as_str_path_relative_or_home(tmp_path, monkeypatch):
  monkeypatch.delenv("JATTR_DATA", raising=False)
  (tmp_path / "d").mkdir()
  assert data.resolve_data_dir(tmp_path / "d") == tmp_path / "d"
  assert data.resolve_data_dir(str(tmp_path / "d")) == tmp_path / "d"
  monkeypatch.chdir(tmp_path)
  resolved = data.resolve_data_dir("d")
  assert resolved.is_absolute() and resolved == tmp_path / "d"
  monkeypatch.setenv("HOME", str(tmp_path))
  assert data.resolve_data_dir("~/d") == tmp_path / "d"


def test_jattr_data_env_var_is_honored(tmp_path, monkeypatch):
  images, _ = _fake_fashion(tmp_path, n=3, split="test")
  monkeypatch.setenv("JATTR_DATA", str(tmp_path))
  assert data.resolve_data_dir(None) == tmp_path.absolute()
  ds = data.load_fashion_mnist(split="test")
  _check_scaled(ds, 3, (28, 28, 1), 3)
  np.testing.assert_allclose(ds.x[..., 0], images / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(ds.y, [0, 1, 2])
  # An explicit argument wins over the environment.
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "elsewhere"))):
    data.resolve_data_dir(tmp_path / "elsewhere")


def test_data_dir_argument_wins_over_jattr_data(tmp_path, monkeypatch):
  _fake_olivetti(tmp_path / "arg")
  _fake_olivetti(tmp_path / "env", y=np.arange(40, dtype=np.uint8)[::-1].copy())
  monkeypatch.setenv("JATTR_DATA", str(tmp_path / "env"))
  np.testing.assert_array_equal(data.load_olivetti().y, np.arange(40)[::-1])
  np.testing.assert_array_equal(data.load_olivetti(tmp_path / "arg").y, np.arange(40))
  assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize("env", [None, ""])
def test_no_data_dir_says_how_to_give_one(monkeypatch, env):
  # An empty $JATTR_DATA counts as unset rather than as the current directory.
  if env is None:
    monkeypatch.delenv("JATTR_DATA", raising=False)
  else:
    monkeypatch.setenv("JATTR_DATA", env)
  with pytest.raises(FileNotFoundError, match=r"--data-dir.*JATTR_DATA"):
    data.resolve_data_dir(None)
  for loader in (data.load_fashion_mnist, data.load_cifar2, data.load_olivetti):
    with pytest.raises(FileNotFoundError, match=r"--data-dir.*JATTR_DATA"):
      loader()


def test_missing_data_dir_is_named(tmp_path, monkeypatch):
  missing = tmp_path / "no-such-dir"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + r".*data_dir argument"):
    data.load_olivetti(missing)
  monkeypatch.setenv("JATTR_DATA", str(missing))
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + r".*\$JATTR_DATA"):
    data.load_olivetti()
  a_file = tmp_path / "file"
  a_file.write_text("")
  with pytest.raises(FileNotFoundError, match=re.escape(str(a_file)) + ".*not a directory"):
    data.resolve_data_dir(a_file)


@pytest.mark.parametrize("loader, split, relpath", [
    (data.load_fashion_mnist, "train", "fashion-mnist/train-images-idx3-ubyte.gz"),
    (data.load_fashion_mnist, "test", "fashion-mnist/t10k-images-idx3-ubyte.gz"),
    (data.load_cifar2, "train", "cifar2_automobile_horse.npz"),
    (data.load_cifar2, "test", "cifar2_automobile_horse.npz"),
    (data.load_olivetti, "all", "olivetti_faces.npz"),
])
def test_missing_file_names_full_path(tmp_path, loader, split, relpath):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / relpath))):
    loader(tmp_path, split)


@pytest.mark.parametrize("split", ["train", "test"])
def test_missing_labels_file_names_full_path(tmp_path, split):
  _fake_fashion(tmp_path, split=split)
  labels = tmp_path / "fashion-mnist" / f"{_FASHION[split]}-labels-idx1-ubyte.gz"
  labels.unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(labels))):
    data.load_fashion_mnist(tmp_path, split)


# ---------------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------------

_IMAGES = "train-images-idx3-ubyte.gz"
_LABELS = "train-labels-idx1-ubyte.gz"


def _break_not_gzip(folder):
  (folder / _IMAGES).write_bytes(b"this is not gzip")
  return _IMAGES, "cannot decompress.*gzip"


def _break_truncated_gzip(folder):
  whole = (folder / _IMAGES).read_bytes()
  (folder / _IMAGES).write_bytes(whole[:len(whole) // 2])  # a download cut short
  return _IMAGES, "cannot decompress.*gzipped IDX"


def _break_empty(folder):
  with gzip.open(folder / _LABELS, "wb") as f:
    f.write(b"\x00\x00")
  return _LABELS, "2 bytes after decompression.*magic number 2049"


def _break_magic(folder):
  _write_idx(folder / _IMAGES, 2049, (3, 28, 28), bytes(3 * 28 * 28))
  return _IMAGES, "magic number 2049; expected 2051"


def _break_labels_magic(folder):  # the images file saved under the labels' name
  _write_idx(folder / _LABELS, 2051, (3, 28, 28), bytes(3 * 28 * 28))
  return _LABELS, "magic number 2051; expected 2049"


def _break_dims(folder):
  _write_idx(folder / _IMAGES, 2051, (3, 27, 28), bytes(3 * 27 * 28))
  return _IMAGES, re.escape("dims (3, 27, 28); expected (N, 28, 28)")


def _break_payload(folder):
  _write_idx(folder / _IMAGES, 2051, (3, 28, 28), bytes(2 * 28 * 28))
  return _IMAGES, "payload of 1568 bytes; expected 2352"


def _break_labels_payload(folder):
  _write_idx(folder / _LABELS, 2049, (3,), bytes(4))
  return _LABELS, "payload of 4 bytes; expected 3"


def _break_header(folder):
  with gzip.open(folder / _LABELS, "wb") as f:
    f.write((2049).to_bytes(4, "big"))
  return _LABELS, "truncated IDX header"


def _break_images_header(folder):
  with gzip.open(folder / _IMAGES, "wb") as f:
    f.write((2051).to_bytes(4, "big") + (3).to_bytes(4, "big"))
  return _IMAGES, r"truncated IDX header \(8 bytes\); expected 16 bytes for rank 3"


def _break_label_count(folder):
  _write_idx(folder / _LABELS, 2049, (2,), bytes(2))
  return _LABELS, "3 images.*2 labels"


def _break_label_values(folder):
  _write_idx(folder / _LABELS, 2049, (3,), bytes([0, 1, 10]))
  return _LABELS, r"\[0, 10\).*\[0, 10\]"


@pytest.mark.parametrize("breaker", [
    _break_not_gzip, _break_truncated_gzip, _break_empty, _break_magic, _break_labels_magic,
    _break_dims, _break_payload, _break_labels_payload, _break_header, _break_images_header,
    _break_label_count, _break_label_values])
def test_malformed_idx_raises_value_error_naming_path(tmp_path, breaker):
  _fake_fashion(tmp_path)
  folder = tmp_path / "fashion-mnist"
  name, expected = breaker(folder)
  with pytest.raises(ValueError) as info:
    data.load_fashion_mnist(tmp_path)
  assert str(folder / name) in _message(info)
  assert re.search(expected, _message(info)), _message(info)


@pytest.mark.parametrize("split, overrides, expected", [
    ("train", {"y_train": None},
     re.escape("missing key 'y_train'; found ['x_test', 'x_train', 'y_test']")),
    ("train", {"x_train": None}, r"missing key 'x_train'"),
    ("test", {"x_test": None}, r"missing key 'x_test'"),
    ("train", {"x_train": np.zeros((4, 32, 32), np.uint8)},
     re.escape("shape (4, 32, 32) dtype uint8; expected (N, 32, 32, 3) uint8")),
    ("train", {"x_train": np.zeros((4, 3, 32, 32), np.uint8)},  # channels first
     re.escape("shape (4, 3, 32, 32) dtype uint8; expected (N, 32, 32, 3) uint8")),
    ("train", {"x_train": np.zeros((4, 32, 32, 3), np.float32)},
     r"dtype float32; expected .* uint8"),
    ("train", {"y_train": np.array([0, 1, 0], np.uint8)},
     re.escape("shape (3,)") + r".*expected \(4,\)"),
    ("train", {"y_train": np.array([0.0, 1.0, 0.0, 1.0])}, r"'y_train'.*float64.*integers"),
    ("train", {"y_train": np.array([0, 1, 2, 1], np.uint8)}, r"labels must lie in \[0, 2\)"),
    ("test", {"y_test": np.array([-1, 0])},
     r"labels must lie in \[0, 2\), got values in \[-1, 0\]"),
])
def test_malformed_cifar2_raises_value_error_naming_path(tmp_path, split, overrides, expected):
  path = _fake_cifar2(tmp_path, **overrides)
  with pytest.raises(ValueError) as info:
    data.load_cifar2(tmp_path, split)
  assert str(path) in _message(info)
  assert re.search(expected, _message(info)), _message(info)


@pytest.mark.parametrize("arrays, expected", [
    ({"images": _olivetti_arrays()["x"], "labels": _olivetti_arrays()["y"]},
     re.escape("missing key 'x'; found ['images', 'labels']")),
    ({**_olivetti_arrays(), "x": _olivetti_arrays()["x"][..., None]},  # a channel axis
     re.escape("shape (40, 64, 64, 1) dtype uint8; expected (N, 64, 64) uint8")),
    ({**_olivetti_arrays(), "x": _ramp((40, 32, 32))},
     re.escape("shape (40, 32, 32) dtype uint8; expected (N, 64, 64) uint8")),
    ({**_olivetti_arrays(), "y": np.arange(1, 41, dtype=np.uint8)},  # person ids 1..40
     r"labels must lie in \[0, 40\), got values in \[1, 40\]"),
    ({**_olivetti_arrays(), "y": np.arange(40, dtype=np.uint8)[:, None]},
     re.escape("'y' has shape (40, 1)")),
])
def test_malformed_olivetti_raises_value_error_naming_path(tmp_path, arrays, expected):
  path = tmp_path / "olivetti_faces.npz"
  np.savez_compressed(path, **arrays)
  with pytest.raises(ValueError) as info:
    data.load_olivetti(tmp_path)
  assert str(path) in _message(info)
  assert re.search(expected, _message(info)), _message(info)


@pytest.mark.parametrize("content", ["text", "npy", "truncated"])
def test_not_an_npz_raises_value_error_naming_path(tmp_path, content):
  path = tmp_path / "olivetti_faces.npz"
  if content == "text":
    path.write_text("not a zip archive")
    expected = "cannot read as .npz"
  elif content == "npy":
    with open(path, "wb") as f:
      np.save(f, np.zeros((400, 64, 64), np.uint8))
    expected = "single .npy array; expected a .npz archive"
  else:  # a download cut short: the zip's central directory at the end is gone
    whole = _fake_olivetti(tmp_path).read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    expected = "cannot read as .npz"
  with pytest.raises(ValueError) as info:
    data.load_olivetti(tmp_path)
  assert str(path) in _message(info)
  assert re.search(re.escape(expected), _message(info)), _message(info)


def test_corrupt_npz_member_raises_value_error_naming_path(tmp_path):
  path = _fake_cifar2(tmp_path)
  with zipfile.ZipFile(path) as z:
    member = z.getinfo("x_train.npy")
  raw = bytearray(path.read_bytes())
  # The member's data follows its 30-byte local header, file name and extra field.
  name_len = int.from_bytes(raw[member.header_offset + 26:member.header_offset + 28], "little")
  extra_len = int.from_bytes(raw[member.header_offset + 28:member.header_offset + 30], "little")
  start = member.header_offset + 30 + name_len + extra_len
  middle = start + member.compress_size // 2
  raw[middle:middle + 8] = bytes(b ^ 0xFF for b in raw[middle:middle + 8])
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError) as info:
    data.load_cifar2(tmp_path)
  assert str(path) in _message(info)
  assert "cannot read 'x_train'/'y_train'" in _message(info), _message(info)
  assert len(data.load_cifar2(tmp_path, "test")) == 2  # the other members still read


# ---------------------------------------------------------------------------------
# Where the real files are looked for: skipped without them, failed without them in CI
# ---------------------------------------------------------------------------------


def test_shared_data_found_via_jattr_data_or_beside_the_repo(tmp_path):
  (tmp_path / "shared" / "data").mkdir(parents=True)
  repo = tmp_path / "repo"
  assert conftest.locate_shared_data({}, repo) == tmp_path / "shared" / "data"
  assert conftest.locate_shared_data({"JATTR_DATA": ""}, repo) == tmp_path / "shared" / "data"
  assert conftest.locate_shared_data({"JATTR_DATA": str(tmp_path)}, repo) == tmp_path
  assert conftest.locate_shared_data({"JATTR_DATA": str(tmp_path), "CI": "true"},
                                     repo) == tmp_path


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
def test_missing_shared_data_skips_outside_ci(tmp_path, ci):
  environ = {} if ci is None else {"CI": ci}
  with pytest.raises(pytest.skip.Exception) as info:
    conftest.locate_shared_data(environ, tmp_path / "repo")
  assert str(tmp_path / "shared" / "data") in _message(info)
  assert "JATTR_DATA" in _message(info) and "CI=true" in _message(info)
  with pytest.raises(pytest.skip.Exception, match=re.escape(str(tmp_path / "elsewhere"))):
    conftest.locate_shared_data({**environ, "JATTR_DATA": str(tmp_path / "elsewhere")},
                                tmp_path / "repo")


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_missing_shared_data_fails_in_ci(tmp_path, ci):
  with pytest.raises(pytest.fail.Exception) as info:
    conftest.locate_shared_data({"CI": ci}, tmp_path / "repo")
  assert "required in CI" in _message(info)
  assert str(tmp_path / "shared" / "data") in _message(info)
  with pytest.raises(pytest.fail.Exception, match=r"required in CI.*" + re.escape(
      str(tmp_path / "elsewhere"))):
    conftest.locate_shared_data({"CI": ci, "JATTR_DATA": str(tmp_path / "elsewhere")},
                                tmp_path / "repo")


# ---------------------------------------------------------------------------------
# Real files (shared_data_dir: skipped where absent, a failure where absent in CI)
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split, n", [("train", 60000), ("test", 10000)])
def test_fashion_mnist_real(shared_data_dir, split, n):
  ds = data.load_fashion_mnist(shared_data_dir, split)
  _check_scaled(ds, n, (28, 28, 1), 10)
  assert ds.name == "fashion_mnist"
  assert ds.x.min() == -1.0 and ds.x.max() == 1.0


@pytest.mark.parametrize("split, n", [("train", 10000), ("test", 2000)])
def test_cifar2_real(shared_data_dir, split, n):
  ds = data.load_cifar2(shared_data_dir, split)
  _check_scaled(ds, n, (32, 32, 3), 2)
  np.testing.assert_array_equal(np.bincount(ds.y), [n // 2, n // 2])


def test_olivetti_real(shared_data_dir):
  ds = data.load_olivetti(shared_data_dir)
  _check_scaled(ds, 400, (64, 64, 1), 40)
  np.testing.assert_array_equal(np.bincount(ds.y), np.full(40, 10))
  assert data.load_olivetti(shared_data_dir, "train").x.shape == ds.x.shape


def test_load_dataset_registry_real(shared_data_dir):
  assert set(data.DATASET_NAMES) == {"digits", "fashion_mnist", "cifar2", "olivetti"}
  ds = data.load_dataset("olivetti", shared_data_dir)
  assert ds.name == "olivetti" and len(ds) == 400
  # digits is embedded: it ignores data_dir and needs no $JATTR_DATA.
  assert len(data.load_dataset("digits", data_dir="/nonexistent")) == 1797
  with pytest.raises(ValueError, match=r"'celeba'.*digits.*fashion_mnist.*cifar2.*olivetti"):
    data.load_dataset("celeba", shared_data_dir)


# ---------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------


def test_take_and_first_n():
  ds = _toy()
  sub = data.take(ds, [3, 0, 3])
  np.testing.assert_array_equal(sub.x, ds.x[[3, 0, 3]])
  np.testing.assert_array_equal(sub.y, ds.y[[3, 0, 3]])
  assert sub.name == "toy" and not np.shares_memory(sub.x, ds.x)
  head = data.first_n(ds, 4)
  np.testing.assert_array_equal(head.x, ds.x[:4])
  assert not np.shares_memory(head.x, ds.x)
  assert len(data.first_n(ds, 0)) == 0
  with pytest.raises(ValueError, match=r"n=13 is larger than .*\(12 examples\)"):
    data.first_n(ds, 13)
  with pytest.raises(ValueError, match=r"\[0, 12\).*\[0, 12\]"):
    data.take(ds, [0, 12])
  with pytest.raises(ValueError, match="1-D integer"):
    data.take(ds, [0.5])


def test_random_subset_is_seeded_sorted_and_unique():
  ds = _toy()
  sub, idx = data.random_subset(ds, 7, seed=3)
  sub2, idx2 = data.random_subset(ds, 7, seed=3)
  np.testing.assert_array_equal(idx, idx2)
  np.testing.assert_array_equal(sub.x, sub2.x)
  assert idx.dtype == np.int64 and len(np.unique(idx)) == 7 and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(sub.y, ds.y[idx])
  others = [data.random_subset(ds, 7, seed=s)[1] for s in range(4, 10)]
  assert any(not np.array_equal(idx, o) for o in others)
  with pytest.raises(ValueError, match=r"n=20 is larger than .*\(12 examples\)"):
    data.random_subset(ds, 20, seed=0)
  with pytest.raises(TypeError, match="seed must be an integer, got None"):
    data.random_subset(ds, 3, seed=None)


def test_per_class_counts_and_seeding():
  ds = _toy((5, 3, 4))
  sub, idx = data.per_class(ds, 2, seed=0)
  np.testing.assert_array_equal(np.bincount(sub.y), [2, 2, 2])
  np.testing.assert_array_equal(idx, data.per_class(ds, 2, seed=0)[1])
  assert np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(sub.y, ds.y[idx])
  # The draw depends on the set of classes, not the order they are listed in.
  _, idx_a = data.per_class(ds, 3, seed=1, classes=[2, 0])
  _, idx_b = data.per_class(ds, 3, seed=1, classes=[0, 2])
  np.testing.assert_array_equal(idx_a, idx_b)
  np.testing.assert_array_equal(np.unique(ds.y[idx_a], return_counts=True)[1], [3, 3])
  with pytest.raises(ValueError, match=r"n_per_class=4 is larger than class 1 .*\(3 examples\)"):
    data.per_class(ds, 4, seed=0)
  with pytest.raises(ValueError, match=r"classes \[7\] do not occur"):
    data.per_class(ds, 1, seed=0, classes=[0, 7])


def test_filter_classes_keeps_labels_and_order():
  ds = _toy((5, 3, 4))
  sub = data.filter_classes(ds, [2, 0])
  np.testing.assert_array_equal(sub.y, [0] * 5 + [2] * 4)
  np.testing.assert_array_equal(sub.x, ds.x[np.isin(ds.y, [0, 2])])
  with pytest.raises(ValueError, match=r"classes \[5\] do not occur.*\[0, 1, 2\]"):
    data.filter_classes(ds, [5])


def test_split_indices_disjoint_seeded_and_sized():
  parts = data.split_indices(100, [70, 20, 10], seed=0)
  assert [len(p) for p in parts] == [70, 20, 10]
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(100))
  assert all(np.all(np.diff(p) > 0) for p in parts)
  again = data.split_indices(100, [70, 20, 10], seed=0)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  other = data.split_indices(100, [70, 20, 10], seed=1)
  assert not np.array_equal(parts[1], other[1])
  partial = data.split_indices(10, [3, 0, 2], seed=0)
  assert [len(p) for p in partial] == [3, 0, 2]
  assert not set(partial[0]) & set(partial[2])
  with pytest.raises(ValueError, match=r"sum to 11, larger than n=10"):
    data.split_indices(10, [5, 6], seed=0)


def test_resize_shape_and_range():
  ds = data.take(data.load_digits(), np.arange(64))
  up = data.resize(ds, 16)
  assert up.x.shape == (64, 16, 16, 1) and up.x.dtype == np.float32
  assert up.x.min() >= -1.0 and up.x.max() <= 1.0
  np.testing.assert_array_equal(up.y, ds.y)
  down = data.resize(up, (4, 6))
  assert down.x.shape == (64, 4, 6, 1)
  assert down.x.min() >= -1.0 and down.x.max() <= 1.0
  # Interpolation weights sum to one: constant images stay constant.
  flat = data.Dataset(x=np.full((2, 8, 8, 3), 1.0, np.float32), y=np.zeros(2, np.int32),
                      name="flat")
  np.testing.assert_allclose(data.resize(flat, 5).x, 1.0, atol=1e-6)
  # Shrinking 12 -> 4 samples every third column; without antialiasing that reads
  # alternate stripes as +-1, with it each output averages its neighbourhood.
  stripes = np.tile(np.array([-1.0, 1.0], np.float32), 6)
  striped = data.Dataset(x=np.broadcast_to(stripes[None, None, :, None], (1, 12, 12, 1)).copy(),
                         y=np.zeros(1, np.int32), name="stripes")
  assert np.abs(data.resize(striped, 4).x).max() < 0.5
  with pytest.raises(ValueError, match="size must be positive"):
    data.resize(ds, 0)
