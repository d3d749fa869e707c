"""Attribution reports a person would rather look at than read.

For each query (a generated sample or a held-out image): a PNG strip with the query
on the left and its top-k training images to the right, each labelled with its rank,
training index and score; and one HTML page showing every strip, linking the full
score matrix (``scores.npz``: ``tau`` [Q, N], the name every jattr score file uses).
"""

from __future__ import annotations

import html
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw

from jattr.io import atomic
from jattr.io.images import save_image, to_uint8


def _tile(img: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] → RGB [size, size, 3], nearest-neighbour scaled."""
  rep = max(1, size // img.shape[0])
  t = img.repeat(rep, 0).repeat(rep, 1)
  if t.shape[-1] == 1:
    t = np.repeat(t, 3, axis=-1)
  return t


def strip(query: np.ndarray, train: np.ndarray, labels: list[str], *, tile: int = 64,
          gap: int = 6) -> Image.Image:
  """One row: the query, a wider gap, then the training images with captions."""
  q = _tile(to_uint8(query), tile)
  ts = [_tile(t, tile) for t in to_uint8(train)]
  th, tw = q.shape[:2]
  caption = 26
  width = tw + 3 * gap + len(ts) * (tw + gap)
  canvas = Image.new("RGB", (width, th + caption + 2 * gap), "white")
  canvas.paste(Image.fromarray(q), (gap, gap))
  draw = ImageDraw.Draw(canvas)
  draw.text((gap, gap + th + 2), "query", fill="black")
  x = tw + 3 * gap
  for img, lab in zip(ts, labels):
    canvas.paste(Image.fromarray(img), (x, gap))
    for j, line in enumerate(lab.split("\n")):
      draw.text((x, gap + th + 2 + 11 * j), line, fill="black")
    x += tw + gap
  return canvas


def write_report(out_dir: str | os.PathLike, queries: np.ndarray, train_images: np.ndarray,
                 scores: np.ndarray, *, train_ids: np.ndarray | None = None, top_k: int = 8,
                 title: str = "jattr attribution report", details: dict | None = None) -> str:
  """Writes ``<out>/query_XXX.png`` strips, ``index.html`` and ``scores.npz``.

  Args:
    out_dir: folder to write into (created).
    queries: [Q, H, W, C] in [-1, 1].
    train_images: [N, H, W, C] in [-1, 1].
    scores: τ [Q, N]; larger = more responsible for the query.
    train_ids: [N] indices of the training images in their dataset (shown in
      captions); default 0..N-1.
    top_k: training images per query.
    title: page title.
    details: key/value pairs shown at the top of the page (method, settings).

  Returns:
    The path of ``index.html``.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  scores = np.asarray(scores)
  q, n = scores.shape
  if queries.shape[0] != q or train_images.shape[0] != n:
    raise ValueError(f"scores {scores.shape} do not match {queries.shape[0]} queries and "
                     f"{train_images.shape[0]} training images")
  train_ids = np.arange(n) if train_ids is None else np.asarray(train_ids)
  top = np.argsort(-scores, axis=1)[:, :top_k]
  atomic.write_npz(out / "scores.npz", compressed=True, tau=scores, top=top, train_ids=train_ids)
  rows = []
  for i in range(q):
    labels = [f"#{r + 1} id {train_ids[j]}\n{scores[i, j]:+.3g}" for r, j in enumerate(top[i])]
    name = f"query_{i:03d}.png"
    save_image(strip(queries[i], train_images[top[i]], labels), out / name)
    rows.append(f'<div class="q"><h3>query {i}</h3><img src="{name}" alt="query {i} and its '
                f'top {top_k} training images"></div>')
  info = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
                 for k, v in (details or {}).items())
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} .q{{margin-bottom:1.2em}}
img{{image-rendering:pixelated}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>Each row: a query (left) and the {top_k} training images with the highest
attribution scores, most responsible first, captioned with rank, training index and
score. All scores: <a href="scores.npz">scores.npz</a> (<code>tau</code> [Q, N],
<code>top</code>, <code>train_ids</code>).</p>
<ul>{info}</ul>
{''.join(rows)}
</body></html>
"""
  atomic.write_text(out / "index.html", page)
  return os.fspath(out / "index.html")
