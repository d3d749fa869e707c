"""Your own data: image folders, .npz/.npy arrays, paths in load_dataset, RunConfig and
the CLI (``jattr.data.own``, ``jattr.data.files.dataset_source``). Everything is built
in ``tmp_path``; nothing trains."""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import PIL.Image
import pytest

from jattr import data
from jattr.cli import build_parser, main
from jattr.cli.run import config_from_args
from jattr.io import guard
from jattr.runs import RunConfig
from jattr.runs.run import training_data


def _png(path: pathlib.Path, pixels: np.ndarray, mode: str | None = None) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(pixels, mode).save(path)
  return path


def _gray(value: int, hw=(4, 5)) -> np.ndarray:
  return np.full(hw, value, np.uint8)


def _classes_folder(root: pathlib.Path) -> pathlib.Path:
  """root/cat/{a,b}.png (values 0, 51), root/dog/{a}.png (255), all gray 4x5."""
  _png(root / "dog" / "a.png", _gray(255))
  _png(root / "cat" / "b.png", _gray(51))
  _png(root / "cat" / "a.png", _gray(0))
  return root


def _csv(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text, encoding="utf-8")
  return path


# ---------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------


def test_folder_labels_from_subfolders_sorted_and_scaled(tmp_path):
  root = _classes_folder(tmp_path / "imgs")
  ds = data.load_image_folder(root)
  assert ds.x.shape == (3, 4, 5, 1) and ds.x.dtype == np.float32
  assert ds.y.dtype == np.int32 and ds.y.tolist() == [0, 0, 1]  # cat/a, cat/b, dog/a
  expected = np.array([0, 51, 255], np.uint8).astype(np.float32) / 127.5 - 1
  np.testing.assert_array_equal(ds.x[:, 0, 0, 0], expected)  # the built-in loaders' floats
  assert ds.name == str(root)
  found = data.scan_image_folder(root)
  assert found.class_names == ("cat", "dog") and found.labels == "subfolders"
  assert [f.as_posix() for f in found.files] == ["cat/a.png", "cat/b.png", "dog/a.png"]
  # Fixed class order renumbers; hidden files and non-images are ignored.
  (root / "cat" / ".hidden.png").write_bytes(b"junk")
  (root / "notes.txt").write_text("x")
  assert data.load_image_folder(root, classes=["dog", "cat"]).y.tolist() == [1, 1, 0]


def test_folder_labels_from_csv_ints_and_names(tmp_path):
  root = tmp_path / "imgs"
  _png(root / "b.png", _gray(10))
  _png(root / "a.png", _gray(20))
  _png(root / "sub" / "c.jpg", _gray(30))  # JPEG, nested
  _csv(root / "labels.csv", "file,label,comment\nsub/c.jpg,7,x\nb.png,0,\na.png,3,y\n")
  ds = data.load_image_folder(root)  # auto: labels.csv
  assert ds.y.tolist() == [3, 0, 7]  # sorted file order a, b, sub/c, not the CSV's
  assert data.scan_image_folder(root).class_names is None
  names = _csv(tmp_path / "names.csv", "label,file\nzebra,a.png\nant,b.png\nzebra,sub/c.jpg\n")
  found = data.scan_image_folder(root, csv=names)
  assert found.y.tolist() == [1, 0, 1] and found.class_names == ("ant", "zebra")
  assert data.load_image_folder(root, labels="csv", csv=names).y.tolist() == [1, 0, 1]


def test_folder_without_labels_and_channels(tmp_path):
  root = tmp_path / "imgs"
  _png(root / "g.png", _gray(0, (3, 3)))
  rgb = np.zeros((3, 3, 3), np.uint8)
  rgb[..., 0] = 255
  _png(root / "r.png", rgb)
  ds = data.load_image_folder(root)
  assert ds.y.tolist() == [0, 0] and ds.x.shape == (2, 3, 3, 3)  # one colour image: RGB
  np.testing.assert_allclose(ds.x[0], -1.0)
  np.testing.assert_allclose(ds.x[1, 0, 0], [1, -1, -1])
  gray = data.load_image_folder(root, channels=1, labels=None)
  assert gray.x.shape == (2, 3, 3, 1)
  np.testing.assert_allclose(gray.x[1, 0, 0, 0], 0.299 * 2 - 1, atol=1e-6)  # luma of red
  rgba = np.concatenate([rgb, np.zeros((3, 3, 1), np.uint8)], -1)  # alpha dropped
  _png(tmp_path / "a" / "x.png", rgba)
  np.testing.assert_allclose(data.load_image_folder(tmp_path / "a").x[0, 0, 0], [1, -1, -1])
  palette = PIL.Image.fromarray(rgb).convert("P")  # palette PNG: colour
  (tmp_path / "p").mkdir()
  palette.save(tmp_path / "p" / "x.png")
  np.testing.assert_allclose(data.load_image_folder(tmp_path / "p").x[0, 0, 0], [1, -1, -1])
  deep = np.full((2, 2), 65535, np.uint16)  # 16-bit grayscale PNG
  _png(tmp_path / "d" / "x.png", deep)
  np.testing.assert_allclose(data.load_image_folder(tmp_path / "d").x, 1.0)


def test_folder_size_resizes_mixed_sizes(tmp_path):
  root = tmp_path / "imgs"
  _png(root / "a.png", _gray(255, (8, 8)))
  _png(root / "b.png", _gray(0, (6, 10)))
  with pytest.raises(ValueError, match=r"imgs: images of 2 different sizes.*a\.png.*b\.png"):
    data.load_image_folder(root)
  ds = data.load_image_folder(root, size=4)
  assert ds.x.shape == (2, 4, 4, 1)
  np.testing.assert_allclose(ds.x[:, 0, 0, 0], [1, -1], atol=1e-6)
  assert data.load_image_folder(root, size=(2, 3)).shape == (2, 3, 1)


def test_folder_bad_inputs_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"image folder .*nope does not exist"):
    data.load_image_folder(tmp_path / "nope")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.txt").write_text("no images")
  with pytest.raises(ValueError, match=r"empty: no images found"):
    data.load_image_folder(empty)
  file = _png(tmp_path / "one.png", _gray(0))
  with pytest.raises(ValueError, match=r"one\.png is a file, not a folder"):
    data.load_image_folder(file)
  broken = tmp_path / "broken"
  _png(broken / "ok.png", _gray(0))
  (broken / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match=r"bad\.png: cannot read as an image"):
    data.load_image_folder(broken)
  truncated = tmp_path / "trunc"
  good = _png(truncated / "t.png", np.arange(64 * 64, dtype=np.uint32).reshape(64, 64)
              .astype(np.uint8)).read_bytes()
  (truncated / "t.png").write_bytes(good[:len(good) // 2])
  with pytest.raises(ValueError, match=r"t\.png: cannot read as an image"):
    data.load_image_folder(truncated)
  mixed = _classes_folder(tmp_path / "mixed")
  _png(mixed / "top.png", _gray(0))
  with pytest.raises(ValueError, match=r"top\.png lie directly in the folder"):
    data.load_image_folder(mixed, labels="subfolders")
  assert len(data.load_image_folder(mixed)) == 4  # auto: not all in sub-folders, no labels
  with pytest.raises(ValueError, match=r"classes 'dog' are not among the given classes"):
    data.load_image_folder(_classes_folder(tmp_path / "c2"), classes=["cat"])
  for kwargs, pattern in [({"channels": 2}, "channels must be 1, 3"),
                          ({"size": 0}, "size must be a positive int"),
                          ({"labels": "folders"}, "labels must be one of"),
                          ({"labels": None, "csv": "x.csv"}, "pass labels='csv'")]:
    with pytest.raises(ValueError, match=pattern):
      data.load_image_folder(mixed, **kwargs)
  split = tmp_path / "split"
  _png(split / "train" / "a.png", _gray(0))
  _png(split / "test" / "a.png", _gray(0))
  with pytest.raises(ValueError, match=r"train/ and test/ sub-folders.*split="):
    data.load_image_folder(split)


def test_csv_bad_inputs_name_the_row(tmp_path):
  root = tmp_path / "imgs"
  _png(root / "a.png", _gray(0))
  _png(root / "b.png", _gray(0))
  cases = [
      ("file,label\na.png,0\nmissing.png,1\n", r"labels\.csv, line 3: names 'missing\.png', "
                                               r"which does not exist"),
      ("file,label\na.png,0\n", r"labels\.csv: no row for 1 image\(s\).*b\.png"),
      ("file,label\na.png,0\nb.png,1\na.png,1\n", r"line 4: 'a\.png' already has a row"),
      ("file,label\na.png,0\nb.png,-2\n", r"line 3: label -2; expected integer labels >= 0"),
      ("name,label\na.png,0\n", r"labels\.csv: the header row .* no column 'file'"),
      ("file,label\na.png,\nb.png,1\n", r"line 2: empty label cell"),
      ("file,label\n", r"labels\.csv has a header but no rows"),
      ("", r"labels\.csv is empty"),
      ("file,label\na.png,0\nlabels.csv,1\n", r"line 3: names 'labels\.csv', which is not a"),
  ]
  for text, pattern in cases:
    _csv(root / "labels.csv", text)
    with pytest.raises(ValueError, match=pattern):
      data.load_image_folder(root)
  with pytest.raises(FileNotFoundError, match=r"labels CSV .*other\.csv not found"):
    data.scan_image_folder(root, labels="csv", csv=tmp_path / "other.csv")


# ---------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------


def test_arrays_uint8_float_latents_cond_and_npy(tmp_path):
  x = np.array([[[0, 255], [51, 102]]] * 3, np.uint8)  # [3, 2, 2]
  np.savez(tmp_path / "a.npz", x=x, y=np.array([2, 0, 1], np.int64))
  ds = data.load_arrays(tmp_path / "a.npz")
  assert ds.x.shape == (3, 2, 2, 1) and ds.x.dtype == np.float32
  np.testing.assert_allclose(ds.x[..., 0], x / 127.5 - 1, atol=1e-6)
  assert ds.y.dtype == np.int32 and ds.y.tolist() == [2, 0, 1]
  latents = np.linspace(-1, 1, 3 * 4 * 4 * 4, dtype=np.float64).reshape(3, 4, 4, 4)
  emb = np.ones((3, 7, 5), np.float16)
  np.savez(tmp_path / "l.npz", z=latents, emb=emb)
  ds, cond = data.load_arrays(tmp_path / "l.npz", x_key="z", cond_key="emb")
  assert ds.x.shape == (3, 4, 4, 4) and ds.x.dtype == np.float32 and ds.y.tolist() == [0] * 3
  np.testing.assert_array_equal(ds.x, latents.astype(np.float32))
  assert cond.shape == (3, 7, 5) and cond.dtype == np.float16  # as stored
  np.save(tmp_path / "i.npy", x[..., None].repeat(3, -1))
  assert data.load_arrays(tmp_path / "i.npy").shape == (2, 2, 3)
  unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 2, 2)
  np.savez(tmp_path / "u.npz", x=unit)
  np.testing.assert_allclose(data.load_arrays(tmp_path / "u.npz", value_range=(0, 1)).x[..., 0],
                             unit * 2 - 1, atol=1e-6)
  np.testing.assert_array_equal(data.load_arrays(tmp_path / "u.npz", value_range=(-1, 1)).x[..., 0],
                                unit)
  np.savez(tmp_path / "i16.npz", x=np.array([[[0, 1000]]], np.int16))
  np.testing.assert_allclose(data.load_arrays(tmp_path / "i16.npz", value_range=(0, 1000)).x
                             .ravel(), [-1, 1])


def test_arrays_bad_inputs_name_the_file_and_key(tmp_path):
  def refused(pattern, exc=ValueError, name="bad.npz", **kwargs):
    with pytest.raises(exc, match=pattern):
      data.load_arrays(tmp_path / name, **kwargs)

  def save(**arrays):
    np.savez(tmp_path / "bad.npz", **arrays)

  img = np.zeros((2, 3, 3), np.uint8)
  save(x=np.linspace(0, 1, 18).reshape(2, 3, 3))
  refused(r"bad\.npz: 'x' has values in \[0, 1\], none negative: ambiguous.*value_range=\(0, 1\)")
  save(x=np.full((2, 3, 3), 1.5))
  refused(r"bad\.npz: 'x' has values in \[1\.5, 1\.5\]; expected floats in \[-1, 1\]")
  save(x=np.full((2, 3, 3), np.nan))
  refused(r"bad\.npz: 'x' holds 18 NaN or infinite value\(s\), the first in image 0")
  save(x=np.zeros((2, 3, 3), np.int64))
  refused(r"bad\.npz: 'x' has dtype int64; expected uint8 .* value_range")
  save(x=np.zeros((2, 3, 3), bool))
  refused(r"bad\.npz: 'x' has dtype bool")
  save(x=np.zeros((2, 3, 3), np.uint16))
  assert data.load_arrays(tmp_path / "bad.npz", value_range=(0, 255)).x.max() == -1.0
  save(x=np.full((2, 3, 3), 300, np.uint16))
  refused(r"'x' has values in \[300, 300\]; expected values in \[0, 255\]", value_range=(0, 255))
  save(x=np.zeros((2, 3), np.uint8))
  refused(r"bad\.npz: 'x' has shape \(2, 3\); expected images \[N, H, W\]")
  save(x=np.zeros((0, 3, 3), np.uint8))
  refused(r"bad\.npz: 'x' has shape \(0, 3, 3, 1\), no images; expected N >= 1")
  save(x=np.zeros((2, 3, 3, 4), np.uint8))
  refused(r"uint8 images with 4 channels; expected 1 or 3")
  save(x=img, y=np.arange(3))
  refused(r"bad\.npz: 'y' has shape \(3,\) dtype int64; expected \(2,\) integers")
  save(x=img, y=np.array([0.0, 1.0]))
  refused(r"'y' has shape \(2,\) dtype float64; expected \(2,\) integers")
  save(x=img, y=np.array([0, -1]))
  refused(r"bad\.npz: 'y' holds negative labels \(min -1, first at index 1\)")
  save(images=img)
  refused(r"bad\.npz: no key 'x' \(x_key\); it holds \['images'\]")
  save(x=img)
  refused(r"no key 'labels' \(y_key\)", y_key="labels")
  refused(r"no key 'emb' \(cond_key\)", cond_key="emb")
  save(x=img, emb=np.zeros((3, 4)))
  refused(r"bad\.npz: 'emb' has shape \(3, 4\); expected \[2, \.\.\.\]", cond_key="emb")
  save(x=img, emb=np.full((2, 4), np.inf))
  refused(r"'emb' holds NaN or infinite values", cond_key="emb")
  save(x=np.array([None, None], dtype=object))
  refused(r"bad\.npz: cannot read \['x'\]")
  (tmp_path / "bad.npz").write_bytes(b"garbage")
  refused(r"bad\.npz: cannot read as \.npz")
  np.save(tmp_path / "single.npy", img)
  refused(r"single\.npy is an \.npy file holding the images alone", name="single.npy",
          x_key="images")
  np.savez(tmp_path / "archive.npy", x=img)  # np.save* picks the name; np.load the format
  (tmp_path / "archive.npy.npz").rename(tmp_path / "archive.npy")
  refused(r"archive\.npy is an \.npz archive, not an \.npy array", name="archive.npy")
  (tmp_path / "x.txt").write_text("1")
  refused(r"x\.txt is not an \.npz or \.npy file", name="x.txt")
  refused(r"array file .*missing\.npz does not exist", FileNotFoundError, name="missing.npz")


# ---------------------------------------------------------------------------------
# load_dataset with a path
# ---------------------------------------------------------------------------------


def test_load_dataset_takes_paths_and_splits(tmp_path, monkeypatch):
  root = _classes_folder(tmp_path / "imgs")
  for split in ("train", "all"):
    ds = data.load_dataset(str(root), split=split)
    assert len(ds) == 3 and ds.name == str(root) and ds.y.tolist() == [0, 0, 1]
  with pytest.raises(ValueError, match=r"split for .*imgs must be one of \('all', 'train'\), "
                                       r"got 'test': it has no train/ and test/ sub-folders"):
    data.load_dataset(str(root), split="test")
  monkeypatch.chdir(tmp_path)  # relative paths are relative to the current directory
  assert data.dataset_source("imgs") == ("folder", pathlib.Path("imgs"))
  assert data.dataset_source("digits") == ("builtin", None)  # names win over paths
  assert len(data.load_dataset("imgs", data_dir="/nonexistent")) == 3  # data_dir unused

  split = tmp_path / "split"
  _classes_folder(split / "train")
  _png(split / "test" / "dog" / "x.png", _gray(0))  # test has only the second class
  assert data.load_dataset(str(split), split="test").y.tolist() == [1]
  assert len(data.load_dataset(str(split), split="train")) == 3
  with pytest.raises(ValueError, match=r"must be one of \('train', 'test'\), got 'all'"):
    data.load_dataset(str(split), split="all")

  x = np.zeros((4, 2, 2), np.uint8)
  np.savez(tmp_path / "two.npz", x_train=x, y_train=np.arange(4), x_test=x[:1])
  assert data.load_dataset(str(tmp_path / "two.npz")).y.tolist() == [0, 1, 2, 3]
  assert data.load_dataset(str(tmp_path / "two.npz"), split="test").y.tolist() == [0]
  np.savez(tmp_path / "one.npz", x=x)
  with pytest.raises(ValueError, match=r"one\.npz must be one of .*: it has no 'x_test' key"):
    data.load_dataset(str(tmp_path / "one.npz"), split="test")
  np.save(tmp_path / "x.npy", x)
  assert data.load_dataset(str(tmp_path / "x.npy"), split="all").shape == (2, 2, 1)


def test_load_dataset_unknown_name_or_path(tmp_path):
  with pytest.raises(ValueError, match=r"no dataset named 'digitz' and no such file or folder"
                                       r".*'digits'.*'olivetti'.*did you mean 'digits'"):
    data.load_dataset("digitz")
  with pytest.raises(ValueError, match=r"no dataset named '.*nowhere\.npz' and no such file"):
    data.load_dataset(str(tmp_path / "nowhere.npz"))
  (tmp_path / "x.csv").write_text("a")
  with pytest.raises(ValueError, match=r"x\.csv is a file but not an \.npz or \.npy file"):
    data.load_dataset(str(tmp_path / "x.csv"))


# ---------------------------------------------------------------------------------
# Run configs and the CLI (nothing trains)
# ---------------------------------------------------------------------------------


def test_run_config_accepts_a_dataset_path(tmp_path):
  root = tmp_path / "digits8"
  for i in range(6):
    _png(root / ("a" if i % 2 else "b") / f"{i}.png", _gray(40 * i, (8, 8)))
  cfg = RunConfig(dataset=str(root), num_train=4)
  assert RunConfig.from_json(cfg.to_json()).dataset == str(root)  # round-trips config.json
  ds, idx = training_data(cfg)  # what `jattr train` loads first, against the digits UNet
  assert ds.shape == (8, 8, 1) and len(ds) == 4 and len(idx) == 4
  with pytest.raises(guard.ConfigError, match=r"dataset = .*no such file or folder"):
    RunConfig(dataset=str(tmp_path / "gone"))
  with pytest.raises(ValueError, match=r"cfg\.json: dataset = .*did you mean 'digits'"):
    RunConfig.from_json({"dataset": "digitz"}, where="cfg.json")


def test_cli_passes_a_dataset_path_through(tmp_path, monkeypatch, capsys):
  root = _classes_folder(tmp_path / "mine")
  monkeypatch.chdir(tmp_path)
  args = build_parser().parse_args(["train", "--dataset", "mine", "--out", "r"])
  cfg = config_from_args(args)
  assert cfg.dataset == str(root.absolute())  # recorded absolute in config.json
  config = tmp_path / "c.json"
  config.write_text(json.dumps({"dataset": "mine", "num_train": 2}))
  args = build_parser().parse_args(["run", "--config", str(config), "--out", "r"])
  assert config_from_args(args).dataset == "mine"  # as the file says
  assert main(["train", "--dataset", "missing_folder", "--out", str(tmp_path / "r")]) == 2
  err = capsys.readouterr().err
  assert re.search(r"jattr train: error: --dataset = \"missing_folder\": no dataset named "
                   r"'missing_folder' and no such file or folder", err), err
  assert not (tmp_path / "r").exists()
