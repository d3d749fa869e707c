"""``wrt``: attribution with respect to a subset of the parameters, everywhere.

The restricted gradients are the selected leaves of the full ones (float64), the
features/scores of ``wrt=None`` are bit-identical to those without the argument,
regex / predicate / mask selecting the same leaves agree exactly, a selector that
selects nothing is an error, and the feature store and curvature files refuse a
changed frozen parameter or another selection. A plain-JAX MLP on 4×4 images keeps
every test to a few seconds.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jattr import cli
from jattr import wrt as wrt_lib
from jattr.bench import registry
from jattr.cli import flags
from jattr.curvature import dense_ggn, fit_diagonal
from jattr.diffusion import draws as draws_lib
from jattr.diffusion import measurements, schedules
from jattr.features import ProjectionConfig, StructuredConfig, featurize
from jattr.features import plain_layer, structured_featurize, structured_layout
from jattr.features.projection import projection_matrix
from jattr.grads import flatten_per_example, per_example_flat_grads, per_example_grads
from jattr.io import curvature_store, hashing
from jattr.io import feature_store as fs_lib
from jattr.io.feature_store import FeatureStore
from jattr.methods import mucs
from jattr.methods.influence import influence
from jattr.runs import RunConfig, check_selection, selection_record, store_featurize

T = 20
SHAPE = (4, 4, 1)
D = 16
H = 6
PROJ = ProjectionConfig(dim=8, kind="rademacher", seed=3, block_size=64)


def apply_fn(params, x_t, t, layer=plain_layer):
  """A tiny MLP denoiser [B, 4, 4, 1], [B] -> [B, 4, 4, 1]; its weights go through ``layer``."""
  b = x_t.shape[0]
  h = layer("fc1", x_t.reshape(b, -1), params["fc1"]["kernel"]) + params["fc1"]["bias"]
  h = jnp.tanh(h + (t.astype(x_t.dtype) / T)[:, None] * params["temb"])
  return layer("fc2", h, params["fc2"]["kernel"]).reshape(x_t.shape)


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {"fc1": {"kernel": jnp.asarray(rng.standard_normal((D, H)) / 4, dtype),
                  "bias": jnp.asarray(rng.standard_normal(H) / 10, dtype)},
          "temb": jnp.asarray(rng.standard_normal(H) / 2, dtype),
          "fc2": {"kernel": jnp.asarray(rng.standard_normal((H, D)) / 3, dtype)}}


def _problem(dtype=jnp.float32, measurement="square_norm"):
  params = _params(dtype)
  draws = draws_lib.fixed_draws(jax.random.key(0), 2, SHAPE, T)
  draws = draws._replace(eps=draws.eps.astype(dtype))
  fn = measurements.measurement_fn(measurement, apply_fn, schedules.linear(T), draws)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((6, *SHAPE)), dtype)
  return params, draws, fn, x


# Three selectors of the same leaves: fc2/kernel and temb.
REGEX = "fc2|temb"


def PREDICATE(path):  # noqa: N802 (a selector, named like the other two)
  return path.startswith("fc2") or path == "temb"


MASK = {"fc1": {"kernel": False, "bias": False}, "temb": True, "fc2": {"kernel": True}}


def test_restricted_grads_are_the_selected_leaves_of_the_full_ones(x64):
  params, _, fn, x = _problem(jnp.float64)
  full = per_example_grads(fn, params, x)
  sub = per_example_grads(fn, params, x, wrt=REGEX, chunk_size=4)  # chunked host loop too
  assert jax.tree.structure(sub) == jax.tree.structure(wrt_lib.split(params, REGEX))
  masked = wrt_lib.split(full, MASK)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14),
               sub, masked)
  flat = per_example_flat_grads(fn, params, x, wrt=REGEX)
  np.testing.assert_allclose(flat, flatten_per_example(masked), rtol=1e-12, atol=1e-14)
  # Features: the projection of exactly those columns.
  phi = featurize(fn, params, x, PROJ, wrt=REGEX)
  p = projection_matrix(PROJ, flat.shape[1], jnp.float64)
  np.testing.assert_allclose(phi, flat @ p, rtol=1e-10, atol=1e-12)


def test_wrt_none_is_bit_identical_and_all_leaves_agree():
  params, draws, fn, x = _problem()
  np.testing.assert_array_equal(featurize(fn, params, x, PROJ, wrt=None),
                                featurize(fn, params, x, PROJ))
  np.testing.assert_array_equal(per_example_flat_grads(fn, params, x, wrt=None),
                                per_example_flat_grads(fn, params, x))
  sched = schedules.linear(T)
  np.testing.assert_array_equal(
      influence(apply_fn, params, sched, draws, x, x[:2], wrt=None),
      influence(apply_fn, params, sched, draws, x, x[:2]))
  assert wrt_lib.restrict(fn, params, None) == (fn, params)
  # A regex selecting every leaf differentiates the same function.
  np.testing.assert_allclose(featurize(fn, params, x, PROJ, wrt=""),
                             featurize(fn, params, x, PROJ), rtol=1e-6, atol=1e-7)


def test_regex_predicate_and_mask_selecting_the_same_leaves_agree():
  params, _, fn, x = _problem()
  phis = [np.asarray(featurize(fn, params, x, PROJ, wrt=w)) for w in (REGEX, PREDICATE, MASK)]
  np.testing.assert_array_equal(phis[0], phis[1])
  np.testing.assert_array_equal(phis[0], phis[2])
  hashes = {wrt_lib.selection_hash(params, w) for w in (REGEX, PREDICATE, MASK)}
  assert len(hashes) == 1
  records = [selection_record(params, w) for w in (REGEX, PREDICATE, MASK)]
  assert [r["selector"] for r in records] == [REGEX, "<callable>", "<mask>"]
  assert records[0]["num_leaves"] == 2 and records[0]["num_parameters"] == H * D + H
  assert hashing.selection_mismatch(records[0], records[2]) is None


def test_restricting_the_same_model_twice_is_one_function():
  params, _, fn, _ = _problem()
  (a, _), (b, _) = wrt_lib.restrict(fn, params, REGEX), wrt_lib.restrict(fn, params, MASK)
  assert a == b and hash(a) == hash(b)  # one compiled chunk program for both
  other = {**params, "fc1": {**params["fc1"], "bias": params["fc1"]["bias"] + 1}}
  assert wrt_lib.restrict(fn, other, REGEX)[0] != a  # other frozen leaves: another function


@pytest.mark.parametrize("wrt", ["nothing_matches", lambda path: False,
                                 {"fc1": {"kernel": False, "bias": False}, "temb": False,
                                  "fc2": {"kernel": False}}])
def test_a_selector_that_selects_nothing_raises(wrt):
  params, _, fn, x = _problem()
  with pytest.raises(ValueError, match="matches no parameter.*fc1/bias"):
    featurize(fn, params, x, PROJ, wrt=wrt)
  with pytest.raises(ValueError, match="matches no parameter"):
    mucs.trainable_mask(params, wrt)


def test_bad_selectors_are_named():
  params = _params()
  with pytest.raises(ValueError, match="not a valid regular expression"):
    wrt_lib.select(params, "(")
  with pytest.raises(TypeError, match="mask pytree of Python bools"):
    wrt_lib.select(params, 3)
  with pytest.raises(ValueError, match="tree structure"):
    wrt_lib.select(params, {"fc1": True})
  with pytest.raises(argparse.ArgumentTypeError, match="not a regular expression"):
    flags.regex("(")


def test_structured_wrt_selects_layers_by_name():
  params, draws, _, x = _problem()
  sched = schedules.linear(T)

  def fn(p, x0, layer):
    return measurements.measurement_fn("square_norm", functools.partial(apply_fn, layer=layer),
                                       sched, draws)(p, x0)

  config = StructuredConfig(dim_in=3, dim_out=2)
  full = structured_featurize(fn, params, x, config)
  only = structured_featurize(fn, params, x, config, wrt="fc2")
  layout = structured_layout(fn, params, x[0], config)
  assert structured_layout(fn, params, x[0], config, wrt="fc2") == {"fc2": slice(0, 6)}
  np.testing.assert_allclose(only, full[:, layout["fc2"]], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="matches no parameter.*layers"):
    structured_featurize(fn, params, x, config, wrt="conv")
  with pytest.raises(TypeError, match="by name"):
    structured_featurize(fn, params, x, config, wrt=MASK)


def test_influence_fits_and_scores_with_one_selection(x64):
  params, draws, _, x = _problem(jnp.float64)
  sched = schedules.linear(T)
  state = fit_diagonal(apply_fn, params, sched, x, draws, estimation_mode="ggn_exact",
                       wrt=MASK)
  full = fit_diagonal(apply_fn, params, sched, x, draws, estimation_mode="ggn_exact")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
               state.diag, wrt_lib.split(full.diag, MASK))
  tau = influence(apply_fn, params, sched, draws, x, x[:2], state, damping=0.1, wrt=REGEX)
  loss = measurements.measurement_fn("loss", apply_fn, sched, draws)
  g = per_example_flat_grads(loss, params, x, wrt=REGEX)
  d = flatten_per_example(jax.tree.map(lambda v: v[None], state.diag))[0]
  np.testing.assert_allclose(tau, (g[:2] / (d + 0.1)) @ g.T, rtol=1e-9)
  with pytest.raises(ValueError, match="does not fit.*same wrt"):
    influence(apply_fn, params, sched, draws, x, x[:2], full, wrt=REGEX)
  # The dense GGN w.r.t. a selection is the [S, S] block of the full one.
  g_full = dense_ggn(apply_fn, params, sched, x[:3], draws)
  g_sub = dense_ggn(apply_fn, params, sched, x[:3], draws, wrt="fc2")
  s = slice(H + D * H, H + D * H + H * D)  # leaf order: fc1/bias, fc1/kernel, fc2/kernel, temb
  np.testing.assert_allclose(g_sub, g_full[s, s], rtol=1e-9, atol=1e-14)


def test_feature_store_refuses_a_changed_frozen_parameter_or_selection(tmp_path):
  params, _, fn, x = _problem()
  n = x.shape[0]

  def config(p, wrt):
    return fs_lib.feature_config(
        params_hash=hashing.model_hash(p), measurement="square_norm", num_draws=2,
        timesteps="uniform", draw_seed=0, projection=PROJ, dataset="toy", num_examples=n,
        examples_hash=hashing.array_hash(np.arange(n)), selection=selection_record(p, wrt))

  # wrt=None records nothing: the config of a store made before selections.
  assert "wrt" not in config(params, None)["model"]
  store = FeatureStore.open(tmp_path / "s", config(params, REGEX), n, PROJ.dim, 4)
  store_featurize(fn, params, x, PROJ, store, wrt=REGEX)
  np.testing.assert_array_equal(store.read(), featurize(fn, params, x, PROJ, wrt=REGEX))
  # Resuming with an equivalent selector (a mask) is the same selection.
  FeatureStore.open(tmp_path / "s", config(params, REGEX), n, PROJ.dim, 4)
  store_featurize(fn, params, x, PROJ, store, wrt=MASK)
  # A frozen leaf (fc1's bias; not differentiated) changed: refused, named.
  moved = {**params, "fc1": {**params["fc1"], "bias": params["fc1"]["bias"] + 1e-3}}
  with pytest.raises(ValueError, match="frozen parameter.*changed"):
    store_featurize(fn, moved, x, PROJ, store, wrt=REGEX)
  with pytest.raises(ValueError, match=r"model\.params_sha256.*model\.wrt\.frozen_sha256"):
    FeatureStore.open(tmp_path / "s", config(moved, REGEX), n, PROJ.dim, 4)
  # Another selection of the same model: refused, both selections named.
  with pytest.raises(ValueError, match="different selection.*'fc2\\|temb'.*wrt=None"):
    store_featurize(fn, params, x, PROJ, store)
  with pytest.raises(ValueError, match=r"model\.wrt"):
    FeatureStore.open(tmp_path / "s", config(params, None), n, PROJ.dim, 4)
  with pytest.raises(ValueError, match="different selection"):
    check_selection(store.config["model"]["wrt"], params, "fc2", "the store")


def test_curvature_file_records_and_checks_the_selection(tmp_path):
  params, draws, _, x = _problem()
  state = fit_diagonal(apply_fn, params, schedules.linear(T), x, draws, wrt=REGEX)
  meta = {"model_hash": hashing.model_hash(params), "wrt": selection_record(params, REGEX)}
  curvature_store.save_curvature(tmp_path / "c", state, meta)
  sub = wrt_lib.split(params, REGEX)
  loaded, got = curvature_store.load_curvature(
      tmp_path / "c", params, selection=selection_record(params, MASK), selected=sub)
  assert got["num_parameters"] == H * D + H and got["wrt"]["selector"] == REGEX
  jax.tree.map(np.testing.assert_array_equal, loaded.diag, state.diag)
  with pytest.raises(ValueError, match="different selection"):
    curvature_store.load_curvature(tmp_path / "c", params)
  moved = {**params, "fc1": {**params["fc1"], "bias": params["fc1"]["bias"] + 1e-3}}
  with pytest.raises(ValueError, match="different model \\(a frozen parameter"):
    curvature_store.load_curvature(tmp_path / "c", moved,
                                   selection=selection_record(moved, REGEX), selected=sub)


def test_lds_variants_and_the_wrt_flag_name_their_rows():
  name, factory = registry.method_factory("trak", wrt="^lora/")
  assert name == "trak[wrt=^lora/]" and factory.keywords["wrt"] == "^lora/"
  name, factory = registry.method_factory("random", wrt="^lora/")  # no parameters involved
  assert name == "random" and factory is registry.METHODS["random"]
  variants = {"trak_lora": {"method": "trak", "wrt": "^lora/"}}
  name, factory = registry.method_factory("trak_lora", variants)
  assert name == "trak_lora" and factory.keywords["wrt"] == "^lora/"
  assert registry.method_factory("trak", variants) == ("trak", registry.METHODS["trak"])
  with pytest.raises(ValueError, match="takes no wrt"):
    registry.method_factory("x", {"x": {"method": "pixel_cosine", "wrt": "a"}})
  with pytest.raises(ValueError, match="own wrt"):
    registry.method_factory("trak_lora", variants, wrt="b")


def test_run_config_leaves_out_a_none_wrt():
  assert "wrt" not in RunConfig().to_json()["attribution"]
  cfg = RunConfig.from_json({**RunConfig().to_json(), "attribution": {"wrt": "^up/"}})
  assert cfg.attribution.wrt == "^up/" and cfg.to_json()["attribution"]["wrt"] == "^up/"
  with pytest.raises(ValueError, match="attribution.wrt.*regular expression"):
    RunConfig.from_json({"attribution": {"wrt": "("}})


def test_every_attributing_command_takes_one_wrt_flag(capsys):
  parser = cli.build_parser()
  for argv in (["featurize", "--out", "s"], ["fit-curvature", "--out", "c"],
               ["influence", "--curvature", "c", "--out", "t.npz"], ["run"], ["train"],
               ["attribute"], ["mucs", "--out", "m.npz"], ["lds", "--config", "c.json"],
               ["counterfactual", "--config", "c.json"]):
    assert parser.parse_args([*argv, "--wrt", "^up/"]).wrt == "^up/", argv
    assert parser.parse_args(argv).wrt is None, argv
  assert parser.parse_args(["mucs", "--out", "m.npz", "--trainable", "fc2"]).wrt == "fc2"
  with pytest.raises(SystemExit) as e:
    parser.parse_args(["featurize", "--out", "s", "--wrt", "("])
  assert e.value.code == 2 and "not a regular expression" in capsys.readouterr().err
