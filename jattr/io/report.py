"""Attribution reports a person would rather look at than read (``docs/report.md``).

Writes into one folder, self-contained (inline CSS and JS, images as relative links):

    index.html       header (method, damping, benchmark link), summary, and one row per
                     query with a thumbnail, sortable (top score, overlap, ...) and
                     paginated, images loaded lazily: usable at thousands of queries
    query_XXX.html   one query: its top-k proponents (τ > 0) and opponents (τ < 0) with
                     id, label, score and share of Σ|τ|, its nearest neighbours by a
                     similarity (pixel cosine) and their overlap with the proponents
    query_XXX.png    the same as one picture, with a histogram of the query's N scores
    scores.npz       ``tau`` [Q, N] (the name every jattr score file uses), ``top``
                     [Q, k] (the k highest scores' columns, best first), ``train_ids`` [N]

Only drawing and writing happen here: scores, neighbours and labels come in as arrays
(``jattr.runs.write_run_report`` computes them).
"""

from __future__ import annotations

import html
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jattr.io import atomic
from jattr.io.images import save_image, to_uint8

PROPONENT = (0, 110, 50)
"""The colour of proponents (τ > 0) in pictures."""
OPPONENT = (180, 30, 30)
"""The colour of opponents (τ < 0)."""
NEUTRAL = (70, 70, 70)


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


_FONTS: dict[int, object] = {}
_ASCII = {"τ": "tau", "Σ": "sum", "ρ": "rho", "≥": ">=", "≤": "<="}


def _font(size: int = 11):
  """DejaVu Sans if the system has it (Greek letters), else Pillow's own font."""
  if size not in _FONTS:
    try:
      _FONTS[size] = ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
      try:
        _FONTS[size] = ImageFont.load_default(size=size)
      except (TypeError, OSError, ImportError, AttributeError):  # Pillow without FreeType
        _FONTS[size] = ImageFont.load_default()
  return _FONTS[size]


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, fill) -> None:
  """``draw.text``, spelling out Greek letters when the font has none (Pillow's own)."""
  if not str(getattr(font, "path", "")).endswith("DejaVuSans.ttf"):
    for k, v in _ASCII.items():
      text = text.replace(k, v)
  draw.text(xy, text, fill=fill, font=font)


def top_indices(scores: np.ndarray, k: int, *, largest: bool = True) -> np.ndarray:
  """[Q, min(k, N)] column indices of each row's k largest (or smallest) scores, in order."""
  v = np.asarray(scores)
  v = -v if largest else v
  k = min(k, v.shape[1])
  part = np.argpartition(v, k - 1, axis=1)[:, :k]
  order = np.argsort(np.take_along_axis(v, part, 1), axis=1, kind="stable")
  return np.take_along_axis(part, order, 1)


def score_histogram(row: np.ndarray, *, marks: Sequence[tuple[float, tuple]] = (),
                    legend: str = "", width: int = 260, height: int = 130,
                    bins: int = 41) -> Image.Image:
  """One query's scores over all N training images: a histogram with log counts.

  Bars right of 0 (proponents) are green, left of 0 (opponents) red; ``marks``
  are (value, colour) dashed vertical lines, e.g. the k-th proponent's and opponent's
  score; ``legend`` is a line of text under the axis.
  """
  row = np.asarray(row, np.float64)
  lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
  if hi <= lo:
    hi = lo + 1.0
  img = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(img)
  font = _font(10)
  left, right, top = 6, width - 6, 16
  bottom = height - (30 if legend else 16)
  counts, edges = np.histogram(row, bins=bins, range=(lo, hi))
  peak = np.log1p(counts.max())

  def x_of(v: float) -> float:
    return left + (v - lo) / (hi - lo) * (right - left)

  for c, a, b in zip(counts, edges[:-1], edges[1:]):
    if c == 0:
      continue
    h = (bottom - top) * np.log1p(c) / peak
    colour = (140, 200, 160) if (a + b) / 2 >= 0 else (225, 150, 150)
    draw.rectangle((x_of(a), bottom - h, max(x_of(b) - 1, x_of(a)), bottom), fill=colour)
  draw.line((left, bottom, right, bottom), fill=NEUTRAL)
  draw.line((x_of(0.0), top - 2, x_of(0.0), bottom), fill=NEUTRAL)
  for value, colour in marks:
    x = x_of(float(value))
    for y in range(top, bottom, 4):
      draw.line((x, y, x, y + 2), fill=colour)
  _text(draw, (left, 1), f"τ over all N = {row.size} training images (log count)", font,
        "black")
  _text(draw, (left, bottom + 2), f"{lo:+.3g}", font, OPPONENT)
  zero_x = x_of(0.0)
  if 30 < zero_x - left and 30 < right - zero_x:
    _text(draw, (zero_x - 3, bottom + 2), "0", font, "black")
  hi_text = f"{hi:+.3g}"
  _text(draw, (right - draw.textlength(hi_text, font=font), bottom + 2), hi_text, font,
        PROPONENT)
  if legend:
    _text(draw, (left, bottom + 15), legend, font, NEUTRAL)
  return img


def panel_tile_shape(image_shape: Sequence[int], tile: int = 72) -> tuple[int, int]:
  """(height, width) of an [H, W, ...] image in a panel (``_tile``'s scaling)."""
  rep = max(1, tile // int(image_shape[0]))
  return int(image_shape[0]) * rep, int(image_shape[1]) * rep


def panel_geometry(tile_shape: tuple[int, int], per_row: int, caption_lines: int, *,
                   gap: int = 6) -> dict:
  """Where ``query_panel`` puts things: cell width, first cell's x, row height, ..."""
  th, tw = tile_shape
  cell, line, band = max(tw, 86), 12, 16
  x0 = gap + max(tw, 100) + 2 * gap
  return {"cell": cell, "line": line, "band": band, "x0": x0, "gap": gap, "tile": (th, tw),
          "row_h": band + th + 3 + caption_lines * line + gap,
          "hist_x": x0 + per_row * (cell + gap) + gap}


def query_panel(query: np.ndarray, query_caption: Sequence[str], rows: Sequence[dict], *,
                histogram: Image.Image | None = None, tile: int = 72,
                gap: int = 6) -> Image.Image:
  """One query's picture: the query on the left, rows of training images to the right.

  Args:
    query: [H, W, C] in [-1, 1].
    query_caption: lines under the query.
    rows: each a dict with ``title`` (str), ``colour`` (RGB of the score line),
      ``images`` ([n, H, W, C] in [-1, 1], n may be 0), ``captions`` (n lists of
      lines; the last line is drawn in ``colour``) and optionally ``framed`` (n
      bools: a frame in ``colour`` around the image) and ``empty`` (text for n = 0).
    histogram: drawn to the right of the rows (``score_histogram``).
    tile: the images' size after nearest-neighbour upscaling (at least).
    gap: pixels between cells.
  """
  font, small = _font(11), _font(10)
  q = _tile(to_uint8(query), tile)
  th, tw = q.shape[:2]
  caption_lines = max([len(c) for r in rows for c in r["captions"]] + [1])
  per_row = max([len(r["captions"]) for r in rows] + [1])
  g = panel_geometry((th, tw), per_row, caption_lines, gap=gap)
  cell, line, band, row_h, x0, hist_x = (g[k] for k in ("cell", "line", "band", "row_h", "x0",
                                                         "hist_x"))
  width = hist_x + (histogram.width + gap if histogram is not None else 0)
  height = max(gap + len(rows) * row_h,
               gap + band + (histogram.height + gap if histogram is not None else 0))
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  canvas.paste(Image.fromarray(q), (gap, gap + band))
  _text(draw, (gap, gap), "query", font, "black")
  for j, text in enumerate(query_caption):
    _text(draw, (gap, gap + band + th + 3 + line * j), text, small, "black")
  for r, spec in enumerate(rows):
    y = gap + r * row_h
    _text(draw, (x0, y), spec["title"], font, spec["colour"])
    n = len(spec["captions"])
    images = to_uint8(spec["images"]) if n else []
    framed = spec.get("framed") or [False] * n
    if not n:
      _text(draw, (x0, y + band + th // 2 - line // 2), spec.get("empty", ""), font, NEUTRAL)
    for c, (img, caption, frame) in enumerate(zip(images, spec["captions"], framed)):
      x = x0 + c * (cell + gap)
      t = _tile(img, tile)
      ix = x + (cell - t.shape[1]) // 2
      canvas.paste(Image.fromarray(t), (ix, y + band))
      if frame:
        draw.rectangle((ix - 3, y + band - 3, ix + t.shape[1] + 2, y + band + t.shape[0] + 2),
                       outline=spec["colour"], width=2)
      for j, text in enumerate(caption):
        colour = spec["colour"] if j == len(caption) - 1 else "black"
        _text(draw, (x, y + band + th + 3 + line * j), text, small, colour)
  if histogram is not None:
    canvas.paste(histogram, (hist_x, gap + band))
  return canvas


def _ordinal(k: int) -> str:
  return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _fmt(v: float) -> str:
  return f"{v:+.3g}"


def _pct(v: float) -> str:
  return f"{100 * v:.1f}%" if abs(v) >= 0.001 else f"{100 * v:.2g}%"


def _label(labels, j) -> str:
  return "" if labels is None else str(labels[j])


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.4em;margin:.2em 0} h2{font-size:1.1em;margin:1.2em 0 .3em}
img{image-rendering:pixelated} .note{background:#fff4d6;border-left:4px solid #e0a800;
padding:.4em .8em;margin:.5em 0} .details{columns:2;font-size:.92em} .muted{color:#666}
table{border-collapse:collapse;font-size:.9em} td,th{padding:2px 8px;text-align:right}
th{background:#f0f0f0;position:sticky;top:0} tr:nth-child(even) td{background:#fafafa}
.pro{color:#006e32} .opp{color:#b41e1e} nav{margin:.3em 0 .8em}
.thumb{overflow:hidden;display:block} .controls button.on{font-weight:bold}
.controls{margin:.6em 0;position:sticky;top:0;background:#fff;padding:.3em 0;z-index:1}"""

_INDEX_JS = """(function () {
  // Sorting (click a button; again to reverse; or open index.html#sort=overlap) and
  // pages of %d rows; hidden rows' lazy images are never fetched.
  var tb = document.querySelector('#queries tbody');
  var rows = Array.prototype.slice.call(tb.rows);
  var per = %d, page = 0, key = 'query', desc = false;
  function num(r, k) { var v = parseFloat(r.dataset[k]); return isNaN(v) ? -Infinity : v; }
  function show() {
    var n = Math.max(1, Math.ceil(rows.length / per));
    page = Math.min(Math.max(page, 0), n - 1);
    rows.forEach(function (r, i) { r.hidden = Math.floor(i / per) !== page; });
    document.getElementById('pageinfo').textContent =
        'page ' + (page + 1) + ' of ' + n + ' (' + rows.length + ' queries)';
  }
  function sortBy(k) {
    desc = (k === key) ? !desc : (k !== 'query');
    key = k;
    rows.sort(function (a, b) {
      return (num(a, k) - num(b, k)) * (desc ? -1 : 1) || num(a, 'query') - num(b, 'query');
    });
    rows.forEach(function (r) { tb.appendChild(r); });
    document.querySelectorAll('button[data-key]').forEach(function (b) {
      b.className = b.dataset.key === k ? 'on' : '';
    });
    page = 0;
    show();
  }
  document.querySelectorAll('button[data-key]').forEach(function (b) {
    b.onclick = function () { sortBy(b.dataset.key); };
  });
  document.getElementById('prev').onclick = function () { page--; show(); };
  document.getElementById('next').onclick = function () { page++; show(); };
  var m = location.hash.match(/sort=(\\w+)/);
  if (m) { sortBy(m[1]); } else { show(); }
})();"""


def _page(title: str, body: str, script: str = "") -> str:
  js = f"<script>\n{script}\n</script>" if script else ""
  return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
          f'<meta name="viewport" content="width=device-width">'
          f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style></head>\n"
          f"<body>\n{body}\n{js}\n</body></html>\n")


def _header(title: str, details: dict | None, notes: Sequence[str],
            links: Sequence[tuple[str, str | None, str]]) -> str:
  info = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
                 for k, v in (details or {}).items())
  out = [f"<h1>{html.escape(title)}</h1>", f'<ul class="details">{info}</ul>']
  out += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
  for text, href, label in links:
    out.append(f"<p>{html.escape(text)} " + (f'<a href="{html.escape(href)}">'
               f"{html.escape(label)}</a>" if href else html.escape(label)) + "</p>")
  return "\n".join(out)


def write_report(out_dir: str | os.PathLike, queries: np.ndarray, train_images: np.ndarray,
                 scores: np.ndarray, *, train_ids: np.ndarray | None = None, top_k: int = 8,
                 title: str = "jattr attribution report", details: dict | None = None,
                 train_labels: Sequence | None = None, query_labels: Sequence | None = None,
                 neighbours: np.ndarray | None = None,
                 neighbour_scores: np.ndarray | None = None,
                 neighbour_rho: np.ndarray | None = None,
                 neighbour_name: str = "pixel cosine", notes: Sequence[str] = (),
                 links: Sequence[tuple[str, str | None, str]] = (), page_size: int = 100) -> str:
  """Writes ``index.html``, ``query_XXX.html`` + ``query_XXX.png`` per query, ``scores.npz``.

  Args:
    out_dir: folder to write into (created).
    queries: [Q, H, W, C] in [-1, 1].
    train_images: [N, H, W, C] in [-1, 1].
    scores: τ [Q, N]; τ > 0: a proponent (more responsible for the query), τ < 0 an
      opponent.
    train_ids: [N] indices of the training images in their dataset (shown in
      captions); default 0..N-1.
    top_k: proponents, opponents and neighbours shown per query.
    title: page title.
    details: key/value pairs shown at the top of the index (method, settings).
    train_labels: [N] class labels (or names) of the training images.
    query_labels: [Q] labels of the queries (held-out images, conditional samples).
    neighbours: [Q, k] training indices (columns of τ) of each query's nearest
      neighbours by some similarity, most similar first; None: no neighbour row.
    neighbour_scores: [Q, k] their similarities.
    neighbour_rho: [Q] rank correlation of τ with that similarity over all N.
    neighbour_name: what the similarity is.
    notes: warnings shown at the top (e.g. untuned damping).
    links: (text, href or None, link text) lines shown at the top (e.g. the benchmark
      row); without an href the link text is shown plain.
    page_size: rows per page of the index.

  Returns:
    The path of ``index.html``.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  scores = np.asarray(scores)
  if scores.ndim != 2 or 0 in scores.shape:
    raise ValueError(f"scores must be τ [Q, N] with Q, N >= 1, got shape {scores.shape}")
  q, n = scores.shape
  if queries.shape[0] != q or train_images.shape[0] != n:
    raise ValueError(f"scores {scores.shape} do not match {queries.shape[0]} queries and "
                     f"{train_images.shape[0]} training images")
  for name, arr, size in (("train_labels", train_labels, n), ("query_labels", query_labels, q),
                          ("train_ids", train_ids, n)):
    if arr is not None and len(arr) != size:
      raise ValueError(f"{name} has {len(arr)} entries, expected {size}")
  if neighbours is not None and (np.shape(neighbours)[0] != q or neighbour_scores is None
                                 or np.shape(neighbour_scores) != np.shape(neighbours)):
    raise ValueError(f"neighbours {np.shape(neighbours)} and neighbour_scores "
                     f"{np.shape(neighbour_scores)} must both be [Q = {q}, k]")
  train_ids = np.arange(n) if train_ids is None else np.asarray(train_ids)
  top = top_indices(scores, top_k)
  bottom = top_indices(scores, top_k, largest=False)
  k = top.shape[1]
  atomic.write_npz(out / "scores.npz", compressed=True, tau=scores, top=top, train_ids=train_ids)

  mass = np.abs(scores).sum(1)
  safe = np.where(mass > 0, mass, 1.0)
  neg_share = np.where(scores < 0, -scores, 0).sum(1) / safe
  kth = scores[np.arange(q), top[:, -1]]
  low = scores[np.arange(q), bottom[:, 0]]
  outweighs = (low < 0) & (-low > kth)
  digits = max(3, len(str(q - 1)))
  names = [f"query_{i:0{digits}d}" for i in range(q)]
  header = _header(title, details, notes, links)
  rows_html = []
  g = panel_geometry(panel_tile_shape(queries.shape[1:]), k, 2 + (train_labels is not None))
  hist_size = (260, 2 * g["row_h"] - g["band"] - g["gap"])
  # The index shows the query and its first 3 proponents, images only, at half size.
  crop = (g["x0"] + 3 * (g["cell"] + g["gap"]), g["gap"] + g["band"] - 3, g["tile"][0] + 6)
  for i in range(q):
    row = scores[i]
    pro = [j for j in top[i] if row[j] > 0]
    opp = [j for j in bottom[i] if row[j] < 0]
    nn = [] if neighbours is None else [int(j) for j in neighbours[i]]
    nn_set, pro_set = set(nn), set(pro)
    overlap = len(nn_set & pro_set)

    def caption(r, j, last):
      lab = [f"label {_label(train_labels, j)}"] if train_labels is not None else []
      return [f"#{r + 1} id {train_ids[j]}", *lab, last]

    panel_rows = [
        {"title": f"top {k} proponents (τ > 0), most helpful first"
                  + ("; framed: also a nearest neighbour" if neighbours is not None else ""),
         "colour": PROPONENT,
         "images": train_images[pro], "empty": "no positive scores",
         "captions": [caption(r, j, f"{_fmt(row[j])} {_pct(row[j] / safe[i])}")
                      for r, j in enumerate(pro)],
         "framed": [j in nn_set for j in pro]},
        {"title": f"top {k} opponents (τ < 0), most harmful first", "colour": OPPONENT,
         "images": train_images[opp], "empty": "no negative scores",
         "captions": [caption(r, j, f"{_fmt(row[j])} {_pct(row[j] / safe[i])}")
                      for r, j in enumerate(opp)]}]
    rank = None
    if neighbours is not None:
      rank = [int((row > row[j]).sum()) + 1 for j in nn]
      panel_rows.append(
          {"title": f"{neighbour_name} nearest neighbours; framed: also a top-{k} proponent "
                    f"({overlap}/{k})", "colour": NEUTRAL, "images": train_images[nn],
           "captions": [caption(r, j, f"sim {neighbour_scores[i][r]:.3f} τ#{rank[r]}")
                        for r, j in enumerate(nn)],
           "framed": [j in pro_set for j in nn]})
    qcap = [f"query {i}"]
    if query_labels is not None:
      qcap.append(f"label {query_labels[i]}")
    qcap += [f"Σ|τ| = {mass[i]:.3g}", f"negative: {_pct(neg_share[i])}"]
    marks = [(row[pro[-1]], PROPONENT)] if pro else []
    marks += [(row[opp[-1]], OPPONENT)] if opp else []
    hist = score_histogram(row, marks=marks, width=hist_size[0], height=hist_size[1],
                           legend=f"dashed: the {_ordinal(k)} proponent and opponent")
    panel = query_panel(queries[i], qcap, panel_rows, histogram=hist)
    save_image(panel, out / f"{names[i]}.png")
    _write_query_page(out, i, names, (title, header), row, pro, opp, nn, rank, neighbour_scores,
                      train_ids, train_labels, query_labels, safe[i], neg_share[i], overlap, k,
                      neighbour_name, None if neighbour_rho is None else neighbour_rho[i])
    best = pro[0] if pro else top[i][0]
    rho = "" if neighbour_rho is None or not np.isfinite(neighbour_rho[i]) else (
        f"{neighbour_rho[i]:.3f}")
    rows_html.append(
        f'<tr data-query="{i}" data-top="{row[best]:.6g}" data-share="{row[best] / safe[i]:.6g}"'
        f' data-opp="{-low[i]:.6g}" data-overlap="{overlap if nn else ""}" data-rho="{rho}">'
        f'<td><a href="{names[i]}.html" class="thumb" style="width:{crop[0] // 2}px;'
        f'height:{crop[2] // 2}px"><img src="{names[i]}.png" loading="lazy" width='
        f'"{panel.width // 2}" height="{panel.height // 2}" style="margin-top:-'
        f'{crop[1] // 2}px" alt="query {i} and its first proponents"></a></td>'
        f'<td><a href="{names[i]}.html">{i}</a></td>'
        + (f"<td>{html.escape(str(query_labels[i]))}</td>" if query_labels is not None else "")
        + f'<td class="pro">{_fmt(row[best])}</td><td>{_pct(row[best] / safe[i])}</td>'
        f"<td>{train_ids[best]}"
        + (f" ({html.escape(_label(train_labels, best))})" if train_labels is not None else "")
        + f'</td><td class="opp">{_fmt(low[i])}</td><td>{_pct(neg_share[i])}</td>'
        + (f"<td>{overlap}/{k}</td><td>{rho}</td>" if nn else "") + "</tr>")

  has_nn = neighbours is not None
  head = ('<tr><th style="text-align:left">query · top 3 proponents</th><th>#</th>'
          + ("<th>label</th>" if query_labels is not None else "")
          + "<th>top τ</th><th>share</th><th>top proponent</th><th>min τ</th>"
          + "<th>τ&lt;0 share</th>"
          + (f"<th>overlap@{k}</th><th>ρ(τ, {html.escape(neighbour_name)})</th>" if has_nn
             else "") + "</tr>")
  sorts = [("query", "query #"), ("top", "top score"), ("share", "top share"),
           ("opp", "strongest opponent")]
  if has_nn:
    sorts += [("overlap", f"overlap with {neighbour_name}"), ("rho", "ρ")]
  buttons = " ".join(f'<button data-key="{key}">{html.escape(text)}</button>'
                     for key, text in sorts)
  summary = (f"<p>{q} queries × N = {n} training images. Of all |τ|, "
             f"<b>{_pct(float(np.where(scores < 0, -scores, 0).sum() / max(mass.sum(), 1e-300)))}"
             f"</b> is negative; for <b>{_pct(float(outweighs.mean()))}</b> of the queries the "
             f"strongest opponent outweighs the {_ordinal(k)} proponent."
             + (f" Mean overlap of the top {k} proponents with the {k} {neighbour_name} "
                f"nearest neighbours: <b>{_mean_overlap(top, scores, neighbours):.2f}</b> of "
                f"{k}." if has_nn else "") + "</p>")
  guide = (f"<p class=\"muted\">Each row: the query and its first proponents (click for the "
           f"query's page: top {k} proponents, top {k} opponents"
           + (f", {neighbour_name} neighbours" if has_nn else "")
           + f" and a histogram of its N scores). <i>share</i> = τ / Σ<sub>i</sub>|τ[q, i]|, "
           f"the score as a fraction of the query's total absolute score. All scores: "
           f'<a href="scores.npz">scores.npz</a> (<code>tau</code> [Q, N]; '
           f"<code>top</code> [Q, {k}], <code>train_ids</code> [N]).</p>")
  controls = (f'<div class="controls">sort by {buttons} &nbsp; <button id="prev">◀</button> '
              f'<span id="pageinfo">{q} queries</span> <button id="next">▶</button></div>')
  body = (f"{header}\n{summary}\n{guide}\n{controls}\n<table id=\"queries\"><thead>{head}"
          f"</thead><tbody>\n" + "\n".join(rows_html) + "\n</tbody></table>")
  per = max(1, page_size)
  atomic.write_text(out / "index.html", _page(title, body, _INDEX_JS % (per, per)))
  return os.fspath(out / "index.html")


def _mean_overlap(top: np.ndarray, scores: np.ndarray, neighbours: np.ndarray) -> float:
  hits = [len({int(j) for j in t if s[j] > 0} & {int(j) for j in nn})
          for t, s, nn in zip(top, scores, neighbours)]
  return float(np.mean(hits)) if hits else 0.0


def _write_query_page(out, i, names, titled, row, pro, opp, nn, rank, neighbour_scores,
                      train_ids, train_labels, query_labels, mass, neg_share, overlap, k,
                      neighbour_name, rho) -> None:
  lab = train_labels is not None
  label_th = "<th>label</th>" if lab else ""

  def table(cls, idx):
    trs = "".join(
        f'<tr data-id="{train_ids[j]}" data-score="{row[j]:.6g}"><td>{r + 1}</td>'
        f"<td>{train_ids[j]}</td>" + (f"<td>{html.escape(_label(train_labels, j))}</td>"
                                      if lab else "")
        + f'<td class="{cls}">{_fmt(row[j])}</td><td>{_pct(row[j] / mass)}</td></tr>'
        for r, j in enumerate(idx))
    return (f'<table class="{cls}"><tr><th>rank</th><th>training id</th>{label_th}<th>τ</th>'
            f"<th>share of Σ|τ|</th></tr>{trs}</table>")

  nav = ['<a href="index.html">index</a>']
  if i > 0:
    nav.append(f'<a href="{names[i - 1]}.html">← query {i - 1}</a>')
  if i + 1 < len(names):
    nav.append(f'<a href="{names[i + 1]}.html">query {i + 1} →</a>')
  qlabel = f" (label {html.escape(str(query_labels[i]))})" if query_labels is not None else ""
  title, header = titled
  parts = [f"<nav>{' · '.join(nav)}</nav>", f'<p class="muted">{html.escape(title)}</p>',
           f"<h1>query {i}{qlabel}</h1>",
           f"<p>Σ|τ| = {mass:.4g}; negative share of it {_pct(neg_share)}. "
           f"<i>share</i> = τ / Σ|τ|.</p>",
           f'<img src="{names[i]}.png" alt="query {i}: proponents, opponents'
           f'{", neighbours" if nn else ""} and the score histogram">',
           f"<h2>Top {k} proponents (τ &gt; 0)</h2>",
           table("pro", pro) if pro else "<p>none: no positive score</p>",
           f"<h2>Top {k} opponents (τ &lt; 0)</h2>",
           table("opp", opp) if opp else "<p>none: no negative score</p>"]
  if nn:
    trs = "".join(
        f'<tr data-id="{train_ids[j]}" data-score="{row[j]:.6g}"><td>{r + 1}</td>'
        f"<td>{train_ids[j]}</td>" + (f"<td>{html.escape(_label(train_labels, j))}</td>"
                                      if lab else "")
        + f"<td>{neighbour_scores[i][r]:.4f}</td><td>{_fmt(row[j])}</td><td>{rank[r]}</td>"
        f"<td>{'yes' if j in pro else ''}</td></tr>" for r, j in enumerate(nn))
    rho_text = "" if rho is None or not np.isfinite(rho) else (
        f" Spearman ρ of τ with {neighbour_name} over all training images: {rho:.3f}.")
    parts += [f"<h2>{html.escape(neighbour_name)} nearest neighbours</h2>",
              f"<p>{overlap} of the {k} nearest neighbours are top-{k} proponents.{rho_text}</p>",
              f'<table class="neighbours"><tr><th>rank</th><th>training id</th>{label_th}'
              f"<th>similarity</th><th>τ</th><th>τ rank</th><th>proponent</th></tr>{trs}</table>"]
  parts.append(f"<details><summary>method, settings and benchmark</summary>{header}</details>")
  atomic.write_text(out / f"{names[i]}.html", _page(f"query {i}", "\n".join(parts)))
