"""Tests for jattr.data: loaders (embedded and real files), file validation, subsets."""

import gzip
import pathlib
import re

import numpy as np
import pytest

from jattr import data

# ---------------------------------------------------------------------------------
# Helpers: tiny synthetic data dirs
# ---------------------------------------------------------------------------------


def _write_idx(path: pathlib.Path, magic: int, dims: tuple[int, ...], payload: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
  with gzip.open(path, "wb") as f:
    f.write(header + payload)


def _fake_fashion(root: pathlib.Path, n: int = 3, split: str = "train") -> np.ndarray:
  """Writes valid IDX files with n images; returns the uint8 images [n, 28, 28]."""
  prefix = "train" if split == "train" else "t10k"
  images = np.arange(n * 28 * 28, dtype=np.int64).reshape(n, 28, 28) % 256
  images = images.astype(np.uint8)
  _write_idx(root / "fashion-mnist" / f"{prefix}-images-idx3-ubyte.gz", 2051, (n, 28, 28),
             images.tobytes())
  _write_idx(root / "fashion-mnist" / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,),
             bytes(range(n)))
  return images


def _fake_cifar2(root: pathlib.Path, **overrides) -> pathlib.Path:
  arrays = {"x_train": np.zeros((4, 32, 32, 3), np.uint8), "y_train": np.array([0, 1, 0, 1]),
            "x_test": np.full((2, 32, 32, 3), 255, np.uint8), "y_test": np.array([1, 0])}
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  path = root / "cifar2_automobile_horse.npz"
  np.savez(path, **arrays)
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
# Real files
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


def test_load_dataset_registry(shared_data_dir):
  assert set(data.DATASET_NAMES) == {"digits", "fashion_mnist", "cifar2", "olivetti"}
  ds = data.load_dataset("olivetti", shared_data_dir)
  assert ds.name == "olivetti" and len(ds) == 400
  # digits is embedded: it ignores data_dir and needs no $JATTR_DATA.
  assert len(data.load_dataset("digits", data_dir="/nonexistent")) == 1797
  with pytest.raises(ValueError, match=r"'celeba'.*digits.*fashion_mnist.*cifar2.*olivetti"):
    data.load_dataset("celeba", shared_data_dir)


@pytest.mark.parametrize("name, split", [("cifar2", "val"), ("fashion_mnist", "all"),
                                         ("olivetti", "test"), ("digits", "test")])
def test_unknown_split_names_the_split(tmp_path, name, split):
  with pytest.raises(ValueError, match=f"split for {name}.*'{split}'"):
    data.load_dataset(name, tmp_path, split)


# ---------------------------------------------------------------------------------
# Data dir rule and missing files
# ---------------------------------------------------------------------------------


def test_jattr_data_env_var_is_honored(tmp_path, monkeypatch):
  images = _fake_fashion(tmp_path, n=3, split="test")
  monkeypatch.setenv("JATTR_DATA", str(tmp_path))
  assert data.resolve_data_dir(None) == tmp_path.absolute()
  ds = data.load_fashion_mnist(split="test")
  _check_scaled(ds, 3, (28, 28, 1), 3)
  np.testing.assert_allclose(ds.x[..., 0], images / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(ds.y, [0, 1, 2])
  # An explicit argument wins over the environment.
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "elsewhere"))):
    data.resolve_data_dir(tmp_path / "elsewhere")


def test_no_data_dir_says_how_to_give_one(monkeypatch):
  monkeypatch.delenv("JATTR_DATA", raising=False)
  with pytest.raises(FileNotFoundError, match=r"--data-dir.*JATTR_DATA"):
    data.resolve_data_dir(None)
  with pytest.raises(FileNotFoundError, match=r"--data-dir.*JATTR_DATA"):
    data.load_cifar2()


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


@pytest.mark.parametrize("loader, relpath", [
    (data.load_fashion_mnist, "fashion-mnist/train-images-idx3-ubyte.gz"),
    (data.load_cifar2, "cifar2_automobile_horse.npz"),
    (data.load_olivetti, "olivetti_faces.npz"),
])
def test_missing_file_names_full_path(tmp_path, loader, relpath):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / relpath))):
    loader(tmp_path)


def test_missing_labels_file_names_full_path(tmp_path):
  _fake_fashion(tmp_path)
  labels = tmp_path / "fashion-mnist" / "train-labels-idx1-ubyte.gz"
  labels.unlink()
  with pytest.raises(FileNotFoundError, match=re.escape(str(labels))):
    data.load_fashion_mnist(tmp_path)


# ---------------------------------------------------------------------------------
# Malformed files
# ---------------------------------------------------------------------------------

_IMAGES = "train-images-idx3-ubyte.gz"
_LABELS = "train-labels-idx1-ubyte.gz"


def _break_not_gzip(folder):
  (folder / _IMAGES).write_bytes(b"this is not gzip")
  return _IMAGES, "gzip"


def _break_magic(folder):
  _write_idx(folder / _IMAGES, 2049, (3, 28, 28), bytes(3 * 28 * 28))
  return _IMAGES, "magic number 2049; expected 2051"


def _break_dims(folder):
  _write_idx(folder / _IMAGES, 2051, (3, 27, 28), bytes(3 * 27 * 28))
  return _IMAGES, re.escape("dims (3, 27, 28); expected (N, 28, 28)")


def _break_payload(folder):
  _write_idx(folder / _IMAGES, 2051, (3, 28, 28), bytes(2 * 28 * 28))
  return _IMAGES, "payload"


def _break_header(folder):
  with gzip.open(folder / _LABELS, "wb") as f:
    f.write((2049).to_bytes(4, "big"))
  return _LABELS, "truncated IDX header"


def _break_label_count(folder):
  _write_idx(folder / _LABELS, 2049, (2,), bytes(2))
  return _LABELS, "3 images.*2 labels"


def _break_label_values(folder):
  _write_idx(folder / _LABELS, 2049, (3,), bytes([0, 1, 10]))
  return _LABELS, r"\[0, 10\)"


@pytest.mark.parametrize("breaker", [_break_not_gzip, _break_magic, _break_dims,
                                     _break_payload, _break_header, _break_label_count,
                                     _break_label_values])
def test_malformed_idx_raises_value_error_naming_path(tmp_path, breaker):
  _fake_fashion(tmp_path)
  folder = tmp_path / "fashion-mnist"
  name, expected = breaker(folder)
  with pytest.raises(ValueError) as info:
    data.load_fashion_mnist(tmp_path)
  assert str(folder / name) in str(info.value)
  assert re.search(expected, str(info.value)), str(info.value)


def test_synthetic_cifar2_reads_and_scales(tmp_path):
  _fake_cifar2(tmp_path)
  test = data.load_cifar2(tmp_path, "test")
  assert test.x.shape == (2, 32, 32, 3) and np.all(test.x == 1.0)
  np.testing.assert_array_equal(test.y, [1, 0])
  assert np.all(data.load_cifar2(tmp_path).x == -1.0)


@pytest.mark.parametrize("overrides, expected", [
    ({"y_train": None}, r"missing key 'y_train'"),
    ({"x_train": np.zeros((4, 32, 32), np.uint8)},
     re.escape("shape (4, 32, 32) dtype uint8; expected (N, 32, 32, 3) uint8")),
    ({"x_train": np.zeros((4, 32, 32, 3), np.float32)}, r"dtype float32; expected .* uint8"),
    ({"y_train": np.array([0, 1, 0])}, re.escape("shape (3,)") + r".*expected \(4,\)"),
    ({"y_train": np.array([0, 1, 2, 1])}, r"labels must lie in \[0, 2\)"),
])
def test_malformed_npz_raises_value_error_naming_path(tmp_path, overrides, expected):
  path = _fake_cifar2(tmp_path, **overrides)
  with pytest.raises(ValueError) as info:
    data.load_cifar2(tmp_path)
  assert str(path) in str(info.value)
  assert re.search(expected, str(info.value)), str(info.value)


@pytest.mark.parametrize("content", ["text", "npy"])
def test_not_an_npz_raises_value_error_naming_path(tmp_path, content):
  path = tmp_path / "olivetti_faces.npz"
  if content == "text":
    path.write_text("not a zip archive")
  else:
    with open(path, "wb") as f:
      np.save(f, np.zeros((400, 64, 64), np.uint8))
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*npz"):
    data.load_olivetti(tmp_path)


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
