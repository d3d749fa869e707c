"""Your own data: a folder of PNG/JPEG images, or arrays in an ``.npz`` / ``.npy`` file.

Both loaders return the same ``Dataset`` as the built-in ones (float32 images in
[-1, 1], shape [N, H, W, C], int32 labels [N]) and check everything at the boundary:
every error is a ``ValueError`` (``FileNotFoundError`` for a path that does not exist)
naming the file, and the key or row, and saying what was expected.

A folder of images (``load_image_folder``)
------------------------------------------

Files ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case) anywhere below the folder
are the examples; other files and names starting with ``.`` are ignored. They are read
in sorted order of their path relative to the folder (compared folder by folder:
``a/x.png`` < ``a/y/z.png`` < ``b/w.png``). Labels come from

* ``labels="subfolders"``: the first folder below the root, ``<root>/<class>/...``;
  the class names, sorted, are labels 0..C-1 (``scan_image_folder(...).class_names[i]``
  names label i; ``Dataset`` has no field for them);
* ``labels="csv"``: a CSV file (``<root>/labels.csv`` unless ``csv=`` names another)
  with a header row holding the columns ``file`` and ``label`` (others are ignored),
  one row per image, ``file`` relative to the root with ``/`` separators. If every
  label is an integer they are the labels as written (each >= 0); otherwise they are
  class names, numbered 0..C-1 in sorted order. Every image must have exactly one row
  and every row must name an image;
* ``labels=None``: no labels, every ``y`` is 0;
* ``labels="auto"`` (the default): ``"csv"`` if ``csv`` is given or ``labels.csv``
  exists, else ``"subfolders"`` if every image lies in a sub-folder, else ``None``.

Pixels are scaled as ``x / 127.5 - 1`` (16-bit grayscale PNGs: ``x / 32767.5 - 1``).
Grayscale images (modes 1, L, LA, I, I;16) have one channel, all others (RGB, RGBA,
palette, CMYK) three; the alpha channel is dropped (not composited) and the JPEG EXIF
orientation is applied. ``channels=None`` gives one channel if every image is
grayscale and three otherwise; ``channels=1`` converts colour with the ITU-R 601-2
luma (``0.299 R + 0.587 G + 0.114 B``), ``channels=3`` repeats a gray channel. All
images must have one size unless ``size`` is given, which resizes each image to
exactly that size with Pillow's bilinear filter (antialiased when shrinking; the
aspect ratio is not kept, so crop beforehand if it matters).

Arrays (``load_arrays``)
------------------------

An ``.npz`` archive with images under ``x_key`` (default ``"x"``), optional labels
under ``y_key`` (default ``"y"``; the default key may be absent, a key you name must
exist) and an optional condition under ``cond_key`` (e.g. text embeddings); or an
``.npy`` file holding the images alone. Images are [N, H, W] (a channel axis is added)
or [N, H, W, C], N >= 1, and

* ``uint8``: pixels 0..255, scaled by ``x / 127.5 - 1``; C must be 1 or 3;
* float (16, 32 or 64 bit): taken as already in [-1, 1], any C (latents with 4
  channels are fine); NaN or infinity is refused, and so is an array with no negative
  value (images scaled to [0, 1] by mistake look like that): pass
  ``value_range=(0, 1)`` to rescale such data, or ``value_range=(-1, 1)`` to take it
  as it is;
* any other integer dtype: refused unless ``value_range`` is given.

``value_range=(lo, hi)`` maps [lo, hi] linearly to [-1, 1] for any dtype; values
outside it are refused. Labels are integers >= 0, one per image. The condition is
[N, ...] with any numeric dtype (finite), returned as stored, beside the ``Dataset``:
``load_arrays(..., cond_key="emb")`` returns ``(dataset, cond)``. Subset functions do
not know about it; index it with the indices they return
(``sub, idx = random_subset(ds, n, seed); cond[idx]``).
"""

from __future__ import annotations

import csv as csv_lib
import difflib
import os
import pathlib
import re
import zipfile
import zlib
from typing import NamedTuple, Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps

from jattr.data.dataset import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File endings (any case) ``load_image_folder`` reads as images."""
ARRAY_SUFFIXES = (".npz", ".npy")
"""File endings ``load_arrays`` reads."""
LABELS_CSV = "labels.csv"
"""The CSV of labels looked for in an image folder when no ``csv`` is given."""
LABEL_SOURCES = ("auto", "subfolders", "csv", None)
"""The values of ``labels`` of ``load_image_folder`` / ``scan_image_folder``."""

_GRAY_MODES = {"1", "L", "LA", "La"}
_GRAY16_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_COLOUR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
_CORRUPT = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
"""What reading a damaged archive raises."""


def open_npz(path: pathlib.Path, expected: str) -> np.lib.npyio.NpzFile:
  """``np.load`` of an .npz archive (no pickles), or a ValueError naming the file and
  ``expected`` (what it should hold) when it is damaged or a single .npy array."""
  try:
    z = np.load(path, allow_pickle=False)
  except _CORRUPT as e:
    raise ValueError(f"{path}: cannot read as .npz ({e}); expected a numpy .npz archive with "
                     f"{expected}") from None
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} holds a single .npy array; expected a .npz archive with "
                     f"{expected} (rename it to .npy, or save it with np.savez)")
  return z
_INT_LABEL = re.compile(r"^[+-]?\d+$")
_SHOWN = 3  # how many offending files an error lists


def _few(items) -> str:
  items = list(items)
  text = ", ".join(str(i) for i in items[:_SHOWN])
  return text + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _existing_dir(path: str | os.PathLike, what: str) -> pathlib.Path:
  root = pathlib.Path(path).expanduser()
  if not root.exists():
    raise FileNotFoundError(f"{what} {root} does not exist")
  if not root.is_dir():
    raise ValueError(f"{what} {root} is a file, not a folder; expected a folder of "
                     f"{'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images")
  return root


# ---------------------------------------------------------------------------------
# A folder of images: which files, which labels
# ---------------------------------------------------------------------------------


class ImageFolder(NamedTuple):
  """What ``load_image_folder`` would read, found without decoding any image.

  Attributes:
    root: the folder.
    files: the image paths relative to ``root``, in load order (sorted).
    y: int32 [N], the label of each file (all 0 without labels).
    class_names: label i is ``class_names[i]`` (sorted sub-folder names, or the sorted
      names in the CSV); None for integer CSV labels or no labels.
    labels: where the labels came from: ``"subfolders"``, ``"csv"`` or None.
  """

  root: pathlib.Path
  files: tuple[pathlib.PurePosixPath, ...]
  y: np.ndarray
  class_names: tuple[str, ...] | None
  labels: str | None


def _list_images(root: pathlib.Path) -> list[pathlib.PurePosixPath]:
  """Image files below ``root`` (symlinks followed, hidden names skipped), sorted."""
  found, seen = [], set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # a symlink cycle
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel = pathlib.PurePosixPath(pathlib.Path(dirpath).relative_to(root).as_posix())
    for f in filenames:
      if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
        found.append(rel / f)
  return sorted(found, key=lambda p: p.parts)


def _numbered(names, classes: Sequence[str] | None, where: str) -> tuple[np.ndarray, tuple]:
  """Labels 0..C-1 of ``names``: indices into ``classes``, or into the sorted names."""
  if classes is None:
    classes = tuple(sorted(set(names)))
  else:
    classes = tuple(str(c) for c in classes)
    if len(set(classes)) != len(classes):
      raise ValueError(f"classes {list(classes)} repeat a name; expected distinct names")
    unknown = sorted(set(names) - set(classes))
    if unknown:
      raise ValueError(f"{where}: classes {_few(map(repr, unknown))} are not among the given "
                       f"classes {list(classes)}")
  index = {c: i for i, c in enumerate(classes)}
  return np.array([index[n] for n in names], np.int32).reshape(-1), classes


def _subfolder_labels(root, files, classes):
  top = [f for f in files if len(f.parts) == 1]
  if top:
    raise ValueError(f"{root}: labels from sub-folders, but {_few(top)} lie directly in "
                     f"the folder; expected every image under <folder>/<class>/")
  return _numbered([f.parts[0] for f in files], classes, str(root))


def _read_csv_rows(path: pathlib.Path) -> list[tuple[int, str, str]]:
  """``(line, file, label)`` of each row of a labels CSV, header checked."""
  try:
    with open(path, "r", newline="", encoding="utf-8-sig") as f:
      reader = csv_lib.reader(f)
      rows = [(reader.line_num, row) for row in reader]  # line_num: the row's last line
  except (OSError, UnicodeDecodeError, csv_lib.Error) as e:
    raise ValueError(f"{path}: cannot read as a UTF-8 CSV file ({e}); expected a header "
                     f"row 'file,label' and one row per image") from None
  rows = [(line, row) for line, row in rows if any(cell.strip() for cell in row)]
  if not rows:
    raise ValueError(f"{path} is empty; expected a header row 'file,label' and one row "
                     f"per image")
  header = [cell.strip() for cell in rows[0][1]]
  missing = [c for c in ("file", "label") if c not in header]
  if missing:
    raise ValueError(f"{path}: the header row {header} has no column {_few(map(repr, missing))}; "
                     f"expected a header row with the columns 'file' and 'label'")
  fi, li = header.index("file"), header.index("label")
  out = []
  for line, row in rows[1:]:
    if len(row) <= max(fi, li):
      raise ValueError(f"{path}, line {line}: {len(row)} cells {row}; expected the columns "
                       f"{header}")
    file, label = row[fi].strip(), row[li].strip()
    if not file or not label:
      raise ValueError(f"{path}, line {line}: empty {'file' if not file else 'label'} cell; "
                       f"expected a file name and a label")
    out.append((line, file, label))
  if not out:
    raise ValueError(f"{path} has a header but no rows; expected one row per image")
  return out


def _csv_labels(root, files, csv_path: pathlib.Path, classes):
  rows = _read_csv_rows(csv_path)
  known = {f.as_posix(): f for f in files}
  label_of: dict[str, tuple[int, str]] = {}
  for line, file, label in rows:
    key = os.path.normpath(file.replace("\\", "/")).replace(os.sep, "/")
    if key not in known:
      target = root / key
      if not target.exists():
        problem = "which does not exist"
      elif not key.lower().endswith(IMAGE_SUFFIXES):
        problem = f"which is not a {'/'.join(IMAGE_SUFFIXES)} image"
      else:
        problem = "which is not an image file below the folder (hidden, or a folder)"
      raise ValueError(f"{csv_path}, line {line}: names {file!r}, {problem} in {root}; "
                       f"expected image paths relative to {root}")
    if key in label_of:
      raise ValueError(f"{csv_path}, line {line}: {file!r} already has a row (line "
                       f"{label_of[key][0]}); expected one row per image")
    label_of[key] = (line, label)
  unlisted = [f for f in files if f.as_posix() not in label_of]
  if unlisted:
    raise ValueError(f"{csv_path}: no row for {len(unlisted)} image(s) of {root}: "
                     f"{_few(unlisted)}; expected one row per image (move the others out)")
  labels = [label_of[f.as_posix()] for f in files]
  if classes is None and all(_INT_LABEL.match(lab) for _, lab in labels):
    values = [(line, int(lab)) for line, lab in labels]
    negative = [(line, v) for line, v in values if v < 0]
    if negative:
      raise ValueError(f"{csv_path}, line {negative[0][0]}: label {negative[0][1]}; expected "
                       f"integer labels >= 0 (or class names)")
    if max(v for _, v in values) > np.iinfo(np.int32).max:
      raise ValueError(f"{csv_path}: label {max(v for _, v in values)} does not fit int32")
    return np.array([v for _, v in values], np.int32).reshape(-1), None
  return _numbered([lab for _, lab in labels], classes, str(csv_path))


def scan_image_folder(path: str | os.PathLike, *, labels: str | None = "auto",
                      csv: str | os.PathLike | None = None,
                      classes: Sequence[str] | None = None) -> ImageFolder:
  """Finds the images of a folder and their labels, without decoding any image.

  Args:
    path: the folder.
    labels: ``"auto"``, ``"subfolders"``, ``"csv"`` or None (see the module docstring).
    csv: the labels CSV (``labels="csv"`` or ``"auto"``); default
      ``<path>/labels.csv``.
    classes: fix the class names, label i = ``classes[i]`` (sub-folder names or CSV
      names; with a CSV, labels are then always read as names). Default: the names
      found, sorted.

  Returns:
    An ``ImageFolder``: the files in load order, their labels and the class names.

  Raises:
    FileNotFoundError: ``path`` or the named ``csv`` does not exist.
    ValueError: no images, an image outside a class folder, a CSV row naming a missing
      file, an image without a row, a negative label, a name not in ``classes``…
  """
  if labels not in LABEL_SOURCES:
    raise ValueError(f"labels must be one of {list(LABEL_SOURCES)}, got {labels!r}")
  root = _existing_dir(path, "image folder")
  files = _list_images(root)
  if not files:
    raise ValueError(f"{root}: no images found; expected {'/'.join(IMAGE_SUFFIXES)} files "
                     f"in the folder or its sub-folders")
  if csv is not None and labels not in ("auto", "csv"):
    raise ValueError(f"csv={str(csv)!r} given with labels={labels!r}; pass labels='csv' "
                     f"(or 'auto') to read labels from it")
  csv_path = pathlib.Path(csv).expanduser() if csv is not None else root / LABELS_CSV
  if labels == "auto":
    if csv is not None or csv_path.is_file():
      labels = "csv"
    elif all(len(f.parts) > 1 for f in files):
      if {"train", "test"} <= {f.parts[0] for f in files}:
        raise ValueError(f"{root} has train/ and test/ sub-folders: load one split with "
                         f"load_dataset({str(path)!r}, split=...) or load_image_folder of "
                         f"{root / 'train'}; pass labels='subfolders' if 'train' and 'test' "
                         f"really are class names")
      labels = "subfolders"
    else:
      labels = None
  if labels == "subfolders":
    y, names = _subfolder_labels(root, files, classes)
  elif labels == "csv":
    if not csv_path.is_file():
      raise FileNotFoundError(f"labels CSV {csv_path} not found; expected a file with a "
                              f"header row 'file,label' and one row per image of {root}")
    y, names = _csv_labels(root, files, csv_path, classes)
  else:
    y, names = np.zeros(len(files), np.int32), None
  return ImageFolder(root=root, files=tuple(files), y=y, class_names=names, labels=labels)


# ---------------------------------------------------------------------------------
# A folder of images: decoding
# ---------------------------------------------------------------------------------


def _hw(size) -> tuple[int, int] | None:
  if size is None:
    return None
  hw = (size, size) if not isinstance(size, (tuple, list)) else tuple(size)
  if len(hw) != 2 or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool)
                             and d >= 1 for d in hw):
    raise ValueError(f"size must be a positive int or a pair (height, width), got {size!r}")
  return int(hw[0]), int(hw[1])


def _read_image(path: pathlib.Path, hw: tuple[int, int] | None
                ) -> tuple[np.ndarray, bool, float]:
  """One image as ``(pixels [h, w] or [h, w, 3], is_gray, white)``: uint8 pixels with
  white 255, or float32 pixels of a 16-bit image with white 65535."""
  try:
    with PIL.Image.open(path) as opened:
      img = PIL.ImageOps.exif_transpose(opened)
      img.load()
  except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as e:
    raise ValueError(f"{path}: cannot read as an image ({type(e).__name__}: {e}); expected "
                     f"a PNG or JPEG file") from None
  mode = img.mode
  if mode in _GRAY16_MODES:
    arr = np.asarray(img).astype(np.float32)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
      raise ValueError(f"{path}: {mode} pixels in [{arr.min():g}, {arr.max():g}]; expected "
                       f"16-bit values 0..65535")
    if hw is not None:
      arr = np.asarray(PIL.Image.fromarray(arr, "F").resize(
          (hw[1], hw[0]), PIL.Image.Resampling.BILINEAR), np.float32)
    return arr, True, 65535.0
  if mode not in _GRAY_MODES and mode not in _COLOUR_MODES:
    raise ValueError(f"{path}: unsupported image mode {mode!r}; expected grayscale (L), "
                     f"RGB or RGBA pixels of 8 bits, or 16-bit grayscale")
  gray = mode in _GRAY_MODES
  if mode in ("P", "PA"):  # via RGBA: a palette's transparency is then just dropped
    img = img.convert("RGBA")
  img = img.convert("L" if gray else "RGB")
  if hw is not None:
    img = img.resize((hw[1], hw[0]), PIL.Image.Resampling.BILINEAR)
  return np.asarray(img), gray, 255.0


def load_image_folder(path: str | os.PathLike, *, size: int | tuple[int, int] | None = None,
                      channels: int | None = None, labels: str | None = "auto",
                      csv: str | os.PathLike | None = None,
                      classes: Sequence[str] | None = None,
                      name: str | None = None) -> Dataset:
  """Loads a folder of PNG/JPEG images (see the module docstring for the rules).

  Args:
    path: the folder.
    size: resize every image to ``size`` x ``size`` or ``(height, width)`` (bilinear,
      antialiased, aspect ratio not kept); None: all images must have one size.
    channels: 1 or 3; None: 1 if every image is grayscale, else 3.
    labels: ``"auto"``, ``"subfolders"``, ``"csv"`` or None (all labels 0).
    csv: the labels CSV; default ``<path>/labels.csv``.
    classes: fix the class names (label i = ``classes[i]``); default: sorted names.
      ``scan_image_folder(path, labels=..., csv=...).class_names`` gives the mapping.
    name: the ``Dataset.name``; default ``str(path)``.

  Returns:
    A ``Dataset``: ``x`` float32 [N, H, W, C] in [-1, 1] (``x / 127.5 - 1``), ``y``
    int32 [N], in sorted file order.

  Raises:
    FileNotFoundError: the folder (or a named CSV) does not exist.
    ValueError: no images, an unreadable image (named), images of different sizes
      without ``size``, bad labels (see ``scan_image_folder``).
  """
  if channels not in (None, 1, 3):
    raise ValueError(f"channels must be 1, 3 or None (inferred), got {channels!r}")
  hw = _hw(size)
  found = scan_image_folder(path, labels=labels, csv=csv, classes=classes)
  pixels, by_size = [], {}
  for rel in found.files:
    pixel = _read_image(found.root / rel, hw)
    pixels.append(pixel)
    by_size.setdefault(pixel[0].shape[:2], []).append(rel)
  if len(by_size) > 1:
    sizes = sorted(by_size.items(), key=lambda kv: -len(kv[1]))
    shown = "; ".join(f"{len(fs)} of {h}x{w} (height x width), e.g. {fs[0]}"
                      for (h, w), fs in sizes[:_SHOWN])
    raise ValueError(f"{found.root}: images of {len(by_size)} different sizes: {shown}; "
                     f"expected one size: resize them beforehand or pass size=(H, W) to "
                     f"jattr.data.load_image_folder")
  c = channels if channels is not None else (1 if all(g for _, g, _ in pixels) else 3)
  x = np.empty((len(pixels), *pixels[0][0].shape[:2], c), np.float32)
  luma = np.array([0.299, 0.587, 0.114], np.float32)
  for i, (arr, gray, white) in enumerate(pixels):  # x = pixel / (white / 2) - 1
    if gray:
      x[i] = arr[..., None]
    elif c == 3:
      x[i] = arr
    else:
      x[i, ..., 0] = arr.astype(np.float32) @ luma
    x[i] /= white / 2.0  # 127.5 for 8 bits: the same floats as the other loaders
  x -= 1.0
  np.clip(x, -1.0, 1.0, out=x)
  return Dataset(x=x, y=found.y, name=str(path) if name is None else name)


# ---------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------


def _scale(x: np.ndarray, path, key: str, value_range) -> np.ndarray:
  """Images of any accepted dtype -> float32 in [-1, 1], or a ValueError naming them."""
  what = f"{path}: {key!r}"
  if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer)
                                 or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f"{what} has dtype {x.dtype}; expected uint8 pixels 0..255 or floats "
                     f"in [-1, 1]")
  if np.issubdtype(x.dtype, np.floating):
    bad = ~np.isfinite(x)
    if bad.any():
      first = np.argwhere(bad)[0]
      raise ValueError(f"{what} holds {int(bad.sum())} NaN or infinite value(s), the first "
                       f"in image {int(first[0])}; expected finite values")
  if value_range is None:
    if x.dtype == np.uint8:
      value_range = (0, 255)
    elif np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{what} has dtype {x.dtype}; expected uint8 pixels 0..255 or floats "
                       f"in [-1, 1] (pass value_range=(lo, hi) to rescale other integers)")
    else:
      lo, hi = float(x.min()), float(x.max())
      if lo < -1.0 or hi > 1.0:
        raise ValueError(f"{what} has values in [{lo:g}, {hi:g}]; expected floats in "
                         f"[-1, 1] (pass value_range=(lo, hi) to rescale)")
      if lo >= 0.0:
        raise ValueError(f"{what} has values in [{lo:g}, {hi:g}], none negative: ambiguous; "
                         f"expected floats in [-1, 1]. Images scaled to [0, 1] look like "
                         f"this: pass value_range=(0, 1) to rescale them (or save x * 2 - 1), "
                         f"or value_range=(-1, 1) if they already are in [-1, 1]")
      return x.astype(np.float32)
  try:
    lo, hi = (float(v) for v in value_range)
  except (TypeError, ValueError):
    raise ValueError(f"value_range must be a pair (lo, hi), got {value_range!r}") from None
  if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
    raise ValueError(f"value_range must be finite with lo < hi, got {value_range!r}")
  got_lo, got_hi = float(x.min()), float(x.max())
  if got_lo < lo or got_hi > hi:
    raise ValueError(f"{what} has values in [{got_lo:g}, {got_hi:g}]; expected values in "
                     f"[{lo:g}, {hi:g}]" + (" (uint8 pixels 0..255)" if x.dtype == np.uint8
                                           else " (value_range)"))
  if (lo, hi) == (-1.0, 1.0):
    return x.astype(np.float32)
  out = x.astype(np.float32)
  out -= lo
  out *= 2.0 / (hi - lo)
  out -= 1.0
  return np.clip(out, -1.0, 1.0, out=out)


def _check_images(x: np.ndarray, path, key: str, value_range) -> np.ndarray:
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"{path}: {key!r} has shape {x.shape}; expected images [N, H, W] or "
                     f"[N, H, W, C]")
  if x.shape[0] == 0:
    raise ValueError(f"{path}: {key!r} has shape {x.shape}, no images; expected N >= 1")
  if 0 in x.shape[1:]:
    raise ValueError(f"{path}: {key!r} has shape {x.shape}; expected images of positive "
                     f"height, width and channels")
  if x.dtype == np.uint8 and value_range is None and x.shape[-1] not in (1, 3):
    raise ValueError(f"{path}: {key!r} has shape {x.shape}: uint8 images with "
                     f"{x.shape[-1]} channels; expected 1 or 3 (drop an alpha channel with "
                     f"x[..., :3]; other data: save it as floats in [-1, 1])")
  return _scale(x, path, key, value_range)


def _check_labels(y: np.ndarray, n: int, path, key: str) -> np.ndarray:
  if y.shape != (n,) or y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{path}: {key!r} has shape {y.shape} dtype {y.dtype}; expected ({n},) "
                     f"integers, one label per image")
  if n and int(y.min()) < 0:
    raise ValueError(f"{path}: {key!r} holds negative labels (min {int(y.min())}, first at "
                     f"index {int(np.argmax(y < 0))}); expected integers >= 0")
  if n and int(y.max()) > np.iinfo(np.int32).max:
    raise ValueError(f"{path}: {key!r} has label {int(y.max())}; expected labels that fit "
                     f"int32")
  return y.astype(np.int32)


def _check_cond(c: np.ndarray, n: int, path, key: str) -> np.ndarray:
  if c.ndim == 0 or c.shape[0] != n:
    raise ValueError(f"{path}: {key!r} has shape {c.shape}; expected [{n}, ...], one "
                     f"condition per image")
  if not (np.issubdtype(c.dtype, np.number) or c.dtype == np.bool_):
    raise ValueError(f"{path}: {key!r} has dtype {c.dtype}; expected numbers")
  if np.issubdtype(c.dtype, np.inexact) and not np.isfinite(c).all():
    raise ValueError(f"{path}: {key!r} holds NaN or infinite values; expected finite values")
  return c


def _array_file(path) -> pathlib.Path:
  p = pathlib.Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"array file {p} does not exist")
  if not p.is_file() or p.suffix.lower() not in ARRAY_SUFFIXES:
    raise ValueError(f"{p} is not an .npz or .npy file; expected a numpy .npz archive or "
                     f".npy array of images")
  return p


def array_keys(path: str | os.PathLike) -> tuple[str, ...]:
  """The keys of an ``.npz`` archive (``()`` for an ``.npy`` file), read without loading."""
  p = _array_file(path)
  if p.suffix.lower() == ".npy":
    return ()
  try:
    with np.load(p, allow_pickle=False) as z:
      return tuple(z.files)
  except _CORRUPT as e:
    raise ValueError(f"{p}: cannot read as .npz ({e}); expected a numpy .npz archive") from None


def load_arrays(path: str | os.PathLike, *, x_key: str = "x", y_key: str | None = "y",
                cond_key: str | None = None, value_range: tuple[float, float] | None = None,
                name: str | None = None) -> Dataset | tuple[Dataset, np.ndarray]:
  """Loads images (and labels, and a condition) from an ``.npz`` or ``.npy`` file.

  See the module docstring for the accepted dtypes, shapes and value ranges.

  Args:
    path: an ``.npz`` archive or an ``.npy`` array (images only).
    x_key: the images' key in the ``.npz``.
    y_key: the labels' key; the default ``"y"`` may be absent (labels 0), a key you
      name must exist; None: no labels.
    cond_key: the key of a condition [N, ...] (e.g. text embeddings), returned beside
      the dataset; None: none.
    value_range: ``(lo, hi)``: map [lo, hi] linearly to [-1, 1]; None: uint8 is
      0..255, floats are [-1, 1] (and must hold a negative value).
    name: the ``Dataset.name``; default ``str(path)``.

  Returns:
    A ``Dataset`` (``x`` float32 [N, H, W, C] in [-1, 1], ``y`` int32 [N]); with
    ``cond_key``, the pair ``(dataset, cond)``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not an ``.npz``/``.npy``, a missing key, N = 0, a wrong dtype or shape,
      values out of range, NaN, labels not one integer >= 0 per image.
  """
  p = _array_file(path)
  if p.suffix.lower() == ".npy":
    if x_key != "x" or y_key not in ("y", None) or cond_key is not None:
      raise ValueError(f"{p} is an .npy file holding the images alone; keys (x_key, y_key, "
                       f"cond_key) need an .npz archive")
    try:
      x = np.load(p, allow_pickle=False)
    except _CORRUPT as e:
      raise ValueError(f"{p}: cannot read as .npy ({e}); expected a numpy array of images "
                       f"[N, H, W] or [N, H, W, C]") from None
    if not isinstance(x, np.ndarray):
      raise ValueError(f"{p} is an .npz archive, not an .npy array; rename it to .npz")
    x = _check_images(x, p, "x", value_range)
    ds = Dataset(x=x, y=np.zeros(len(x), np.int32), name=str(path) if name is None else name)
    return ds
  z = open_npz(p, f"images under {x_key!r}")
  with z:
    wanted = {"x_key": x_key, "cond_key": cond_key}
    if y_key is not None and (y_key != "y" or "y" in z.files):
      wanted["y_key"] = y_key
    for arg, key in wanted.items():
      if key is not None and key not in z.files:
        hint = difflib.get_close_matches(key, z.files, n=1)
        raise ValueError(f"{p}: no key {key!r} ({arg}); it holds {sorted(z.files)}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    try:
      arrays = {arg: z[key] for arg, key in wanted.items() if key is not None}
    except _CORRUPT as e:
      raise ValueError(f"{p}: cannot read {sorted(k for k in wanted.values() if k)} ({e}); "
                       f"expected numeric arrays (no objects)") from None
  x = _check_images(arrays["x_key"], p, x_key, value_range)
  y = (_check_labels(arrays["y_key"], len(x), p, y_key) if "y_key" in arrays
       else np.zeros(len(x), np.int32))
  ds = Dataset(x=x, y=y, name=str(path) if name is None else name)
  if cond_key is None:
    return ds
  return ds, _check_cond(arrays["cond_key"], len(x), p, cond_key)
