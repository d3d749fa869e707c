"""The attribution report: contents (proponents, opponents, labels, neighbours), links.

The HTML is parsed with ``html.parser``: every ``<img src>`` and ``<a href>`` of every
page must name a file that exists, and the tables must list the right training images
in the right order. (The screenshots in docs/figures were taken with headless
Chromium; CI does not need a browser.)
"""

import dataclasses
import html.parser
import json
import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

from jattr import cli
from jattr.data import load_digits
from jattr.io.report import top_indices, write_report
from jattr.runs import RunConfig, label_names, pixel_neighbours, report_run, write_run_report
from jattr.runs.config import AttributionConfig
from jattr.runs.report_parts import (BENCHMARK_ROWS, RESULTS_DOC, SKETCH_ROWS, benchmark_row,
                                     damping_header, sketch_damping_header,
                                     github_anchor)
from jattr.runs.run import training_data


class _Page(html.parser.HTMLParser):
  """Links, images and the rows of the tables of one HTML page."""

  def __init__(self):
    super().__init__()
    self.links, self.images, self.tables, self.rows = [], [], {}, []
    self._table = None

  def handle_starttag(self, tag, attrs):
    a = dict(attrs)
    if tag == "a" and "href" in a:
      self.links.append(a["href"])
    elif tag == "img":
      self.images.append(a)
    elif tag == "table":
      self._table = a.get("class") or a.get("id")
      self.tables.setdefault(self._table, [])
    elif tag == "tr" and "data-id" in a and self._table is not None:
      self.tables[self._table].append((int(a["data-id"]), float(a["data-score"])))
    elif tag == "tr" and "data-query" in a:
      self.rows.append(a)


def parse(path: pathlib.Path) -> _Page:
  page = _Page()
  page.feed(path.read_text(encoding="utf-8"))
  return page


def assert_links_resolve(folder: pathlib.Path) -> int:
  """Every img src and a href of every page of a report names an existing file."""
  pages = sorted(folder.glob("*.html"))
  assert pages
  checked = 0
  for path in pages:
    page = parse(path)
    for target in [i["src"] for i in page.images] + page.links:
      assert not re.match(r"^[a-z]+:", target), f"{path.name}: non-relative link {target}"
      file = target.split("#")[0]
      assert (path.parent / file).exists(), f"{path.name}: {target} does not resolve"
      checked += 1
  return checked


def _tiny_report(tmp_path, q=5, n=30, k=4, page_size=2):
  rng = np.random.default_rng(0)
  train = rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)
  queries = rng.uniform(-1, 1, (q, 8, 8, 1)).astype(np.float32)
  tau = rng.normal(size=(q, n)).astype(np.float32)
  tau[-1] = np.abs(tau[-1])  # the last query has no opponent
  labels = [str(i % 10) for i in range(n)]
  nn = np.stack([rng.permutation(n)[:k] for _ in range(q)])
  sim = np.sort(rng.uniform(size=(q, k)))[:, ::-1]
  out = tmp_path / "report"
  page = write_report(out, queries, train, tau, train_ids=np.arange(100, 100 + n), top_k=k,
                      details={"method": "test"}, train_labels=labels,
                      query_labels=["a"] * q, neighbours=nn, neighbour_scores=sim,
                      neighbour_rho=np.linspace(-1, 1, q), notes=["the damping is untuned"],
                      links=[("benchmark:", "index.html#x", "here")], page_size=page_size)
  return out, pathlib.Path(page), tau, nn


def test_proponents_and_opponents_in_order_with_labels(tmp_path):
  out, _, tau, nn = _tiny_report(tmp_path)
  k = 4
  for i in range(tau.shape[0]):
    page = parse(out / f"query_{i:03d}.html")
    order = np.argsort(-tau[i])
    pro = [(100 + j, tau[i, j]) for j in order[:k]]
    assert [t[0] for t in page.tables["pro"]] == [p[0] for p in pro]
    np.testing.assert_allclose([t[1] for t in page.tables["pro"]], [p[1] for p in pro],
                               rtol=1e-5)
    neg = [j for j in np.argsort(tau[i]) if tau[i, j] < 0][:k]
    assert [t[0] for t in page.tables.get("opp", [])] == [100 + j for j in neg]
    scores = [t[1] for t in page.tables.get("opp", [])]
    assert scores == sorted(scores) and all(s < 0 for s in scores)
    assert [t[0] for t in page.tables["neighbours"]] == list(100 + nn[i])
    text = (out / f"query_{i:03d}.html").read_text()
    for j in order[:k]:  # the label column: training id 100 + j has label j % 10
      assert f"<td>{100 + j}</td><td>{j % 10}</td>" in text
  assert "none: no negative score" in (out / "query_004.html").read_text()


def test_every_link_resolves_and_the_index_scales(tmp_path):
  out, index, tau, _ = _tiny_report(tmp_path)
  assert assert_links_resolve(out) > 5 * 4
  page = parse(index)
  assert [int(r["data-query"]) for r in page.rows] == list(range(5))
  assert all(i.get("loading") == "lazy" for i in page.images)
  assert [i["src"] for i in page.images] == [f"query_{i:03d}.png" for i in range(5)]
  text = index.read_text()
  assert "var per = 2," in text and "the damping is untuned" in text
  for key in ("top", "overlap", "rho", "opp", "share"):
    assert f'data-key="{key}"' in text
  assert all({"data-top", "data-overlap", "data-rho"} <= set(r) for r in page.rows)
  np.testing.assert_allclose([float(r["data-top"]) for r in page.rows], tau.max(1), rtol=1e-5)
  z = np.load(out / "scores.npz")
  assert sorted(z.files) == ["tau", "top", "train_ids"]
  np.testing.assert_array_equal(z["tau"], tau)
  np.testing.assert_array_equal(z["top"], top_indices(tau, 4))


def test_write_report_refuses_mismatched_shapes(tmp_path):
  x = np.zeros((2, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match=r"\(3, 4\)"):
    write_report(tmp_path, x, np.zeros((4, 8, 8, 1)), np.zeros((3, 4)))
  with pytest.raises(ValueError, match="train_labels"):
    write_report(tmp_path, x, np.zeros((4, 8, 8, 1)), np.zeros((2, 4)), train_labels=["0"])


@pytest.mark.slow
def test_index_at_1000_queries(tmp_path):
  """The same code as the tests above, at the issue's scale: 1,000 queries, 10 pages."""
  out, index, tau, _ = _tiny_report(tmp_path, q=1000, n=200, k=8, page_size=100)
  page = parse(index)
  assert len(page.rows) == 1000 and "var per = 100," in index.read_text()
  assert all(i.get("loading") == "lazy" for i in page.images)
  assert (out / "query_999.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on this machine")
def test_index_sorts_and_pages_in_a_real_browser(tmp_path):
  """Headless Chromium runs the index's script: #sort=overlap sorts, pages hide rows."""
  out, index, _, nn = _tiny_report(tmp_path, q=7, page_size=3)
  dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--dump-dom", index.as_uri() + "#sort=rho"], capture_output=True,
                       text=True, timeout=120, check=True).stdout
  rows = re.findall(r'<tr (data-query="(\d+)"[^>]*)>', dom)
  assert [int(q) for _, q in rows] == list(range(6, -1, -1))  # rho = linspace(-1, 1): reversed
  assert [" hidden" in r for r, _ in rows] == [False] * 3 + [True] * 4
  assert "page 1 of 3 (7 queries)" in dom


def test_top_indices_matches_argsort():
  s = np.random.default_rng(1).normal(size=(6, 50))
  np.testing.assert_array_equal(top_indices(s, 7), np.argsort(-s, axis=1)[:, :7])
  np.testing.assert_array_equal(top_indices(s, 7, largest=False), np.argsort(s, axis=1)[:, :7])
  assert top_indices(s, 80).shape == (6, 50)


def test_pixel_neighbours_find_an_exact_copy():
  x = load_digits().x[:50]
  queries = x[[3, 17]]
  tau = np.random.default_rng(0).normal(size=(2, 50)).astype(np.float32)
  idx, sim, rho = pixel_neighbours(queries, x, tau, 5, block=1)
  assert idx.shape == (2, 5) and list(idx[:, 0]) == [3, 17]
  np.testing.assert_allclose(sim[:, 0], 1.0, rtol=1e-5)
  assert np.all(np.diff(sim, axis=1) <= 1e-6) and np.all(np.abs(rho) < 0.5)
  _, _, rho_self = pixel_neighbours(queries, x, np.asarray(
      [np.sum(queries[i] * x, axis=(1, 2, 3)) / np.linalg.norm(x.reshape(50, -1), axis=1)
       for i in range(2)]), 5)
  np.testing.assert_allclose(rho_self, 1.0, rtol=1e-5)


def test_label_names():
  assert label_names("digits", np.array([3, 0])) == ["3", "0"]
  assert label_names("cifar2", [1, 0]) == ["horse", "automobile"]


def test_benchmark_rows_exist_in_results_md(tmp_path):
  """The rows the report quotes are in docs/results.md, and its link resolves."""
  headings = {github_anchor(line.lstrip("#")) for line in RESULTS_DOC.read_text().splitlines()
              if line.startswith("#")}
  for name in [*BENCHMARK_ROWS.values(), *SKETCH_ROWS.values()]:
    row = benchmark_row(name)
    assert row is not None, name
    assert row["anchor"] in headings and re.match(r"0\.\d+ \[", row["cells"][2]), row
  assert benchmark_row("no such method") is None
  detail, notes, links = damping_header(AttributionConfig(method="trak"), 1.5e-3, tmp_path)
  assert "library default (not tuned)" in detail and "untuned" in notes[0]
  assert "0.642" in links[0][0]  # D-TRAK square_norm's untuned row
  href = links[0][1]
  assert (tmp_path / href.split("#")[0]).resolve() == RESULTS_DOC.resolve()
  assert href.endswith("#results-the-digits-and-fashion-mnist-lds-benchmarks")  # the summary
  detail, notes, _ = damping_header(AttributionConfig(relative_damping=0.1), 1.0, tmp_path)
  assert "set in the run's config" in detail and not notes
  detail, notes, links = sketch_damping_header(AttributionConfig(), 2e-4, tmp_path)
  assert "library default (not tuned)" in detail and "untuned" in notes[0]
  assert "Fashion-MNIST" in notes[0] and "0.697" in links[0][0]  # the sketch's default row
  detail, notes, _ = sketch_damping_header(AttributionConfig(damping_factor=0.01), 1.0, tmp_path)
  assert "set in the run's config" in detail and not notes


def _fake_run(tmp_path, num_samples=3, num_train=40):
  """A run directory with a config and samples (no checkpoint: reports need none)."""
  cfg = dataclasses.replace(RunConfig(), num_train=num_train)
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(cfg.to_json()))
  ds, idx = training_data(cfg)
  samples = ds.x[:num_samples] + 0.01  # near-copies of the first training images
  np.savez(run / "samples.npz", x=samples)
  return run, cfg, ds, idx


def test_report_run_from_any_score_file(tmp_path, capsys):
  run, cfg, ds, idx = _fake_run(tmp_path)
  tau = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32)
  np.savez(tmp_path / "influence.npz", tau=tau, method="trak", damping=0.5, train_indices=idx)
  assert cli.main(["report", "--scores", str(tmp_path / "influence.npz"), "--run", str(run),
                   "--top-k", "4"]) == 0
  out = run / "reports" / "influence"
  assert "report in" in capsys.readouterr().out
  assert assert_links_resolve(out) > 0
  page = parse(out / "query_001.html")
  pro = page.tables["pro"]
  assert [t[0] for t in pro] == list(idx[np.argsort(-tau[1])[:4]])
  assert page.tables["neighbours"][0][0] == idx[1]  # the sample is a near-copy of image 1
  text = (out / "query_001.html").read_text()
  assert f"<td>{idx[1]}</td><td>{ds.y[1]}</td>" in text  # the digit's label
  index = (out / "index.html").read_text()
  assert "trak" in index and "damping" in index and "docs/results.md" in index
  # The report's own scores.npz rebuilds the same report elsewhere.
  assert cli.main(["report", "--scores", str(out / "scores.npz"), "--run", str(run),
                   "--out", str(tmp_path / "again"), "--top-k", "4"]) == 0
  np.testing.assert_array_equal(np.load(tmp_path / "again" / "scores.npz")["top"],
                                np.load(out / "scores.npz")["top"])
  # Training queries carry labels.
  tau_train = np.zeros((40, 40), np.float32) + np.eye(40, dtype=np.float32)
  np.savez(tmp_path / "self.npz", tau=tau_train)
  report_run(run, tmp_path / "self.npz", queries="train", out=tmp_path / "self", top_k=2)
  assert f"<h1>query 5 (label {ds.y[5]})</h1>" in (tmp_path / "self" / "query_005.html").read_text()


def test_report_run_refuses_mismatched_scores(tmp_path, capsys):
  run, _, _, idx = _fake_run(tmp_path)
  np.savez(tmp_path / "wrong.npz", tau=np.zeros((3, 39)))
  with pytest.raises(ValueError, match=r"wrong\.npz.*\(3, 39\).*\(3, 40\)"):
    report_run(run, tmp_path / "wrong.npz")
  assert cli.main(["report", "--scores", str(tmp_path / "wrong.npz"), "--run", str(run),
                   "--queries", "train"]) == 2
  assert "(40, 40)" in capsys.readouterr().err
  np.savez(tmp_path / "nokey.npz", scores=np.zeros((3, 40)))
  with pytest.raises(ValueError, match=r"no array 'tau'.*\['scores'\]"):
    report_run(run, tmp_path / "nokey.npz")
  np.savez(tmp_path / "other.npz", tau=np.zeros((3, 40)), train_ids=idx[::-1])
  with pytest.raises(ValueError, match="another training set"):
    report_run(run, tmp_path / "other.npz")


def test_write_run_report_uses_pixel_neighbours(tmp_path):
  x = load_digits()
  train = type(x)(x.x[:20], x.y[:20], x.name)
  tau = -np.ones((2, 20), np.float32)
  tau[:, 7] = 1.0
  write_run_report(tmp_path, train.x[[7, 9]], tau, train, np.arange(20), top_k=3)
  page = parse(tmp_path / "query_000.html")
  assert page.tables["pro"] == [(7, 1.0)]
  assert page.tables["neighbours"][0][0] == 7 and len(page.tables["opp"]) == 3
  assert "1 of the 3 nearest neighbours are top-3 proponents" in (
      tmp_path / "query_000.html").read_text()
