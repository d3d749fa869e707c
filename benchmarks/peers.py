"""jattr against the PyTorch tools, side by side in one process, on the same net.

The net: ``chunking.py``'s plain-JAX 4-conv denoiser (native ``lax.conv``, 3x3 convs
1 -> 32 -> 32 -> 32 -> 1, SiLU, a sinusoidal time embedding through two dense
layers), ported weight for weight into a ``torch.nn.Module`` (``TorchConv4``: the
HWIO kernels as OIHW, the dense kernels transposed). Both are fed the same digits
images (8x8), the same K fixed (t, ε) draws (``jattr.diffusion.fixed_draws``) and
the same loss, f = the mean over the draws of the per-pixel mean squared error;
before anything is timed the script checks that the two losses agree and that the
per-example gradients have the same Gram matrix (an order-free comparison of the
gradients themselves).

Featurization (``--sections featurize``): N examples in chunks / batches of C, for
each k of ``--dims``:

  - torch ``torch.func.vmap(grad)`` per batch of C, then traker's ``BasicProjector``
    (Rademacher) as ``TRAKer`` builds it on a CPU (block_size 100: the k columns of
    P regenerated in blocks of 100 on every batch);
  - the same with ``block_size = k``: P generated once and kept (P·k floats of
    memory that neither jattr nor TRAKer's default spend);
  - jattr ``featurize`` with the dense Rademacher P, chunk_size C;
  - jattr ``featurize`` with the sparse P (``kind="sparse"``, s = 2), chunk_size C.

EK-FAC influence (``--sections ekfac``): N training examples, Q queries, f = the
loss. kronfluence (``Analyzer.fit_all_factors`` with ``strategy="ekfac"``, then
``compute_pairwise_scores``) is driven with one row per (example, draw): its
dataset holds the N·K pairs (x_t, t, ε) and the Q·K query pairs, its Fisher samples
one target per row from the model's Gaussian (``sample=True``: y = output +
√(D/2)·z, so that the loss gradient has the covariance of the GGN's H_out =
(2/D)·I), its damping is its heuristic, 0.1 × the mean eigenvalue per module
(``damping_factor=None``), and its [Q·K, N·K] scores are averaged over the draws
on both sides into [Q, N] (gradients are linear, so this is ∇m_qᵀ(G + λ)⁻¹∇ℓ_i).
jattr: ``fit_kfac`` + ``fit_ekfac`` with ``estimation_mode="fisher_gradients"``
(one sampled target per example-draw) and its default damping (0.1 × the mean
eigenvalue per block), then ``influence``. The two score matrices are compared by
Spearman correlation (per query, and over all Q·N entries).

Every configuration runs once first (for jattr the compile time is reported apart,
from ``jax.monitoring``), then ``--reps`` rounds in which every configuration runs
once, interleaved; the tables give medians of wall and process CPU time (all
threads), with the load average. Torch uses its default thread count (the core
count) and XLA its own.

The peers are not jattr dependencies. Install them into a separate environment:

    python -m venv .venv-peers
    .venv-peers/bin/pip install torch==2.13.0      # the CPU build (a plain `torch` may be CUDA)
    .venv-peers/bin/pip install traker kronfluence -e '.[test]'
    .venv-peers/bin/python benchmarks/peers.py                       # both sections
    .venv-peers/bin/python benchmarks/peers.py --sections ekfac --ekfac-n 1000 --ekfac-q 100
    .venv-peers/bin/python benchmarks/peers.py --quick               # a scaled-down check

Prints markdown tables and writes benchmarks/results/peers.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jattr.curvature import fit_ekfac, fit_kfac
from jattr.data import load_digits
from jattr.diffusion import fixed_draws, measurements, schedules
from jattr.features import ProjectionConfig, featurize
from jattr.grads import per_example_flat_grads
from jattr.methods.influence import influence

from _bench import CompileClock, env_record, interleaved, ints, log, write_results
from chunking import conv4_apply, conv4_init

ROOT = pathlib.Path(__file__).resolve().parents[1]
T = 1000
INSTALL = ("benchmarks/peers.py needs torch, traker and kronfluence, which are not jattr "
           "dependencies: python -m venv .venv-peers && .venv-peers/bin/pip install "
           "torch==2.13.0 && .venv-peers/bin/pip install traker kronfluence -e '.[test]'")


def import_peers():
  try:
    import kronfluence  # noqa: F401
    import torch
    import trak  # noqa: F401
  except ImportError as e:
    raise SystemExit(f"{e}\n{INSTALL}") from None
  return torch


# ---------------------------------------------------------------------------------
# the torch port of the 4-conv denoiser
# ---------------------------------------------------------------------------------


def torch_model(jax_params: dict):
  """``TorchConv4`` with ``jax_params``' weights (HWIO -> OIHW, dense transposed)."""
  torch = import_peers()
  nn = torch.nn

  class TorchConv4(nn.Module):
    def __init__(self, width: int, emb: int, hidden: int):
      super().__init__()
      chans = [1, width, width, width, 1]
      self.emb, self.width = emb, width
      for i in range(4):
        setattr(self, f"conv{i}", nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
      self.time1 = nn.Linear(emb, hidden)
      self.time2 = nn.Linear(hidden, 3 * width)

    def forward(self, x, t):  # x [B, 1, H, W], t [B]
      half = self.emb // 2
      freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=x.dtype) / half)
      angles = t.to(x.dtype)[:, None] * freqs[None]
      e = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
      e = nn.functional.silu(self.time1(e))
      shifts = self.time2(e).reshape(x.shape[0], 3, self.width)
      h = x
      for i in range(4):
        h = getattr(self, f"conv{i}")(h)
        if i < 3:
          h = nn.functional.silu(h + shifts[:, i, :, None, None])
      return h

  width = jax_params["conv0"]["w"].shape[-1]
  emb, hidden = jax_params["time1"]["w"].shape
  model = TorchConv4(width, emb, hidden)
  with torch.no_grad():
    for i in range(4):
      conv = getattr(model, f"conv{i}")
      hwio = np.asarray(jax_params[f"conv{i}"]["w"])
      conv.weight.copy_(torch.from_numpy(hwio.transpose(3, 2, 0, 1).copy()))  # OIHW
      conv.bias.copy_(torch.from_numpy(np.array(jax_params[f"conv{i}"]["b"])))
    for name in ("time1", "time2"):
      lin = getattr(model, name)
      lin.weight.copy_(torch.from_numpy(np.asarray(jax_params[name]["w"]).T.copy()))
      lin.bias.copy_(torch.from_numpy(np.array(jax_params[name]["b"])))
  return model.eval()


def nchw(a) -> np.ndarray:
  """[..., H, W, C] -> [..., C, H, W] (a copy)."""
  a = np.asarray(a)
  return np.ascontiguousarray(np.moveaxis(a, -1, -3))


def torch_loss_fn(model, schedule, draws):
  """``loss(params, x0 [1, H, W]) -> scalar``: f over the K draws, for torch.func."""
  torch = import_peers()
  from torch.func import functional_call
  ab = torch.from_numpy(schedule.alphas_bar.astype(np.float32))
  t = torch.from_numpy(np.asarray(draws.t, np.int64))
  eps = torch.from_numpy(nchw(draws.eps))  # [K, 1, H, W]
  a, s = ab[t].sqrt()[:, None, None, None], (1 - ab[t]).sqrt()[:, None, None, None]

  def loss(params, x0):
    xt = a * x0[None] + s * eps
    out = functional_call(model, params, (xt, t))
    return ((out - eps) ** 2).mean()

  return loss


def torch_per_example_grads(model, loss):
  """``grads(params, x [B, 1, H, W]) -> [B, P]`` (torch.func.vmap of grad)."""
  torch = import_peers()
  from torch.func import grad, vmap
  batched = vmap(grad(loss), in_dims=(None, 0))

  def grads(params, x):
    g = batched(params, x)
    return torch.cat([g[k].reshape(x.shape[0], -1) for k in params], dim=1)

  return grads


def check_port(jax_params, model, schedule, draws, x):
  """Loss and per-example-gradient Gram matrix, JAX against torch, on a few examples."""
  torch = import_peers()
  fn = measurements.measurement_fn("loss", conv4_apply, schedule, draws)
  jl = np.asarray(jax.vmap(fn, (None, 0))(jax_params, jnp.asarray(x)))
  loss = torch_loss_fn(model, schedule, draws)
  params = {k: v.detach() for k, v in model.named_parameters()}
  tx = torch.from_numpy(nchw(x))
  tl = np.array([float(loss(params, tx[i])) for i in range(len(x))])
  jg = np.asarray(per_example_flat_grads(fn, jax_params, jnp.asarray(x)), np.float64)
  tg = torch_per_example_grads(model, loss)(params, tx).numpy().astype(np.float64)
  jgram, tgram = jg @ jg.T, tg @ tg.T
  out = {"num_params_jax": int(jg.shape[1]), "num_params_torch": int(tg.shape[1]),
         "loss_max_rel_diff": float(np.max(np.abs(jl - tl) / np.abs(jl))),
         "gram_max_rel_diff": float(np.max(np.abs(jgram - tgram)) / np.max(np.abs(jgram)))}
  log(f"port check: {out}")
  if out["num_params_jax"] != out["num_params_torch"] or out["loss_max_rel_diff"] > 1e-4 \
     or out["gram_max_rel_diff"] > 1e-3:
    raise SystemExit(f"the torch port does not match the JAX net: {out}")
  return out


# ---------------------------------------------------------------------------------
# featurization
# ---------------------------------------------------------------------------------


def featurize_calls(args, jax_params, model, schedule, draws, x):
  torch = import_peers()
  from trak.projectors import BasicProjector, ProjectionType
  fn = measurements.measurement_fn("loss", conv4_apply, schedule, draws)
  loss = torch_loss_fn(model, schedule, draws)
  grads = torch_per_example_grads(model, loss)
  params = {k: v.detach() for k, v in model.named_parameters()}
  tx = torch.from_numpy(nchw(x))
  jx = jnp.asarray(x)
  num_params = sum(int(v.numel()) for v in params.values())
  c, n = args.chunk, x.shape[0]
  calls = {}
  for k in args.dims:
    for label, block in (("torch vmap(grad) + traker BasicProjector (TRAKer's CPU default)", 100),
                         ("torch vmap(grad) + traker BasicProjector, P kept (block = k)", k)):
      proj = BasicProjector(num_params, k, 0, ProjectionType.rademacher, "cpu",
                            block_size=block)

      def torch_run(proj=proj):
        with torch.no_grad():
          return torch.cat([proj.project(grads(params, tx[s:s + c]), model_id=0)
                            for s in range(0, n, c)])

      calls[(k, label)] = torch_run
    for label, cfg in (("jattr featurize, dense Rademacher", ProjectionConfig(k, "rademacher")),
                       ("jattr featurize, sparse s = 2", ProjectionConfig(k, "sparse", nonzeros=2))):
      calls[(k, label)] = (lambda cfg: lambda: featurize(fn, jax_params, jx, cfg, chunk_size=c))(cfg)
  return calls


def block_any(out):
  return jax.block_until_ready(out) if isinstance(out, jax.Array) else out


def featurize_section(args, jax_params, model, schedule, draws, clock) -> dict:
  x = load_digits().x[:args.n]
  calls = featurize_calls(args, jax_params, model, schedule, draws, x)
  names = {f"{k}|{label}": call for (k, label), call in calls.items()}
  timed = interleaved(names, args.reps, clock, block_any)
  rows = []
  for key, r in timed.items():
    k, label = key.split("|", 1)
    if not label.startswith("jattr"):
      r["compile_s"] = None  # torch is eager: its first call is its warm-up
    rows.append({"dim": int(k), "method": label, **r})
  return {"n": args.n, "chunk": args.chunk, "draws": args.draws, "rows": rows}


# ---------------------------------------------------------------------------------
# EK-FAC influence
# ---------------------------------------------------------------------------------


def kronfluence_run(model, schedule, draws, train_x, query_x, args, workdir):
  """kronfluence's EK-FAC scores [Q, N], one row per (example, draw) (module docstring)."""
  torch = import_peers()
  from kronfluence.analyzer import Analyzer, prepare_model
  from kronfluence.arguments import FactorArguments, ScoreArguments
  from kronfluence.task import Task
  from torch.utils.data import TensorDataset

  ab = torch.from_numpy(schedule.alphas_bar.astype(np.float32))
  t = torch.from_numpy(np.asarray(draws.t, np.int64))
  eps = torch.from_numpy(nchw(draws.eps))
  num_draws = t.shape[0]
  pixels = int(np.prod(eps.shape[1:]))

  def pairs(x):
    x = torch.from_numpy(nchw(x))  # [N, 1, H, W]
    a = ab[t].sqrt()[None, :, None, None, None]
    s = (1 - ab[t]).sqrt()[None, :, None, None, None]
    xt = (a * x[:, None] + s * eps[None]).reshape(-1, *x.shape[1:])
    return TensorDataset(xt, t.repeat(x.shape[0]), eps.repeat(x.shape[0], 1, 1, 1))

  class DiffusionTask(Task):
    def compute_train_loss(self, batch, model, sample=False):
      xt, tt, target = batch
      out = model(xt, tt)
      if sample:  # a target from the model's Gaussian: Cov[∇_out ℓ] = (2/D)·I
        with torch.no_grad():
          target = out.detach() + math.sqrt(pixels / 2) * torch.randn_like(out)
      return ((out - target) ** 2).mean(dim=(1, 2, 3)).sum()

    def compute_measurement(self, batch, model):
      xt, tt, target = batch
      return ((model(xt, tt) - target) ** 2).mean(dim=(1, 2, 3)).sum()

  torch.manual_seed(0)
  task = DiffusionTask()
  model = prepare_model(copy.deepcopy(model), task)  # it wraps the modules in place
  analyzer = Analyzer(analysis_name="peers", model=model, task=task, cpu=True,
                      disable_tqdm=True, output_dir=str(workdir), disable_model_save=True)
  train, queries = pairs(train_x), pairs(query_x)
  analyzer.fit_all_factors(factors_name="ekfac", dataset=train,
                           per_device_batch_size=args.ekfac_batch * num_draws,
                           factor_args=FactorArguments(strategy="ekfac"),
                           overwrite_output_dir=True)
  analyzer.compute_pairwise_scores(
      scores_name="ekfac", factors_name="ekfac", query_dataset=queries, train_dataset=train,
      per_device_query_batch_size=args.ekfac_batch * num_draws,
      per_device_train_batch_size=args.ekfac_batch * num_draws,
      score_args=ScoreArguments(damping_factor=None), overwrite_output_dir=True)
  scores = analyzer.load_pairwise_scores("ekfac")["all_modules"].numpy()
  q, n = query_x.shape[0], train_x.shape[0]
  return scores.reshape(q, num_draws, n, num_draws).mean(axis=(1, 3))


def jattr_ekfac_run(jax_params, schedule, draws, train_x, query_x, args):
  common = dict(estimation_mode="fisher_gradients", key=jax.random.key(0),
                batch_size=args.ekfac_batch, chunk_size=args.ekfac_batch * draws.t.shape[0])
  kf = fit_kfac(conv4_apply, jax_params, schedule, train_x, draws, **common)
  ek = fit_ekfac(conv4_apply, jax_params, schedule, train_x, draws, kf, **common)
  return jax.block_until_ready(influence(conv4_apply, jax_params, schedule, draws, train_x,
                                         query_x, ek, chunk_size=args.ekfac_batch))


def spearman_rows(a, b) -> np.ndarray:
  ra = np.argsort(np.argsort(a, axis=1), axis=1).astype(np.float64)
  rb = np.argsort(np.argsort(b, axis=1), axis=1).astype(np.float64)
  ra -= ra.mean(1, keepdims=True)
  rb -= rb.mean(1, keepdims=True)
  return (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))


def ekfac_section(args, jax_params, model, schedule, draws, clock) -> dict:
  digits = load_digits().x
  if args.ekfac_n + args.ekfac_q > digits.shape[0]:
    raise SystemExit(f"--ekfac-n + --ekfac-q must be at most {digits.shape[0]} (the digits)")
  train_x = jnp.asarray(digits[:args.ekfac_n])
  query_x = jnp.asarray(digits[args.ekfac_n:args.ekfac_n + args.ekfac_q])
  workdir = tempfile.mkdtemp(prefix="jattr-peers-")
  out = {}

  def kron():
    out["kronfluence"] = kronfluence_run(model, schedule, draws, np.asarray(train_x),
                                         np.asarray(query_x), args, workdir)

  def jat():
    out["jattr"] = np.asarray(jattr_ekfac_run(jax_params, schedule, draws, train_x, query_x,
                                              args))

  timed = interleaved({"kronfluence EK-FAC (fit + score)": kron,
                       "jattr EK-FAC (fit + score)": jat}, args.ekfac_reps, clock)
  timed["kronfluence EK-FAC (fit + score)"]["compile_s"] = None
  rho = spearman_rows(out["jattr"], out["kronfluence"])
  flat = spearman_rows(out["jattr"].reshape(1, -1), out["kronfluence"].reshape(1, -1))[0]
  agreement = {"spearman_per_query_mean": float(rho.mean()),
               "spearman_per_query_min": float(rho.min()), "spearman_all_entries": float(flat)}
  log(f"score agreement: {agreement}")
  return {"n": args.ekfac_n, "q": args.ekfac_q, "draws": args.draws,
          "batch": args.ekfac_batch, "rows": [{"method": k, **v} for k, v in timed.items()],
          "agreement": agreement}


# ---------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def report(res: dict) -> str:
  env = res["env"]
  lines = [f"{env['date']}, {env['cpus']} CPUs ({env['backend']}), load average "
           f"{env['load_before']} before / {env['load_after']} after, jax {env['jax']}, "
           f"torch {res.get('torch', '?')}; the 4-conv net ({res['port']['num_params_jax']:,} "
           f"parameters; port check: losses within {res['port']['loss_max_rel_diff']:.1e}, "
           f"gradient Gram within {res['port']['gram_max_rel_diff']:.1e}); "
           f"{env['args']['reps']} interleaved reps (medians)."]
  f = res.get("featurize")
  if f:
    lines += ["", f"Featurization: N = {f['n']}, chunk / batch C = {f['chunk']}, K = {f['draws']}.",
              "", "| k | method | wall s | CPU s | examples/s | jattr ÷ traker default (ex/s) "
              "| first call s | compile s |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted({r["dim"] for r in f["rows"]}):
      rows = [r for r in f["rows"] if r["dim"] == k]
      peer = next(r for r in rows if "default" in r["method"])
      for r in rows:
        ratio = f"**{peer['wall_s'] / r['wall_s']:.1f}x**" if r["method"].startswith("jattr") else ""
        lines.append(f"| {k} | {r['method']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | "
                     f"{f['n'] / r['wall_s']:.1f} | {ratio} | {r['first_call_s']:.1f} | "
                     f"{_fmt(r['compile_s'], '.1f')} |")
  e = res.get("ekfac")
  if e:
    a = e["agreement"]
    lines += ["", f"EK-FAC influence: N = {e['n']} training examples, Q = {e['q']} queries, "
              f"K = {e['draws']} draws, batches of {e['batch']} examples "
              f"({e['batch'] * e['draws']} example-draw rows); score agreement: Spearman "
              f"{a['spearman_all_entries']:.5f} over all entries, per query mean "
              f"{a['spearman_per_query_mean']:.5f} (min {a['spearman_per_query_min']:.5f}).", "",
              "| method | wall s | CPU s | kronfluence ÷ jattr (wall) | first call s | compile s |",
              "|---|---|---|---|---|---|"]
    peer = next(r for r in e["rows"] if r["method"].startswith("kronfluence"))
    for r in e["rows"]:
      ratio = f"**{peer['wall_s'] / r['wall_s']:.1f}x**" if r["method"].startswith("jattr") else ""
      lines.append(f"| {r['method']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {ratio} | "
                   f"{r['first_call_s']:.1f} | {_fmt(r['compile_s'], '.1f')} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sections", default="featurize,ekfac")
  p.add_argument("--n", type=int, default=256, help="examples featurized")
  p.add_argument("--chunk", type=int, default=64, help="chunk / batch size C of featurization")
  p.add_argument("--dims", type=ints, default=[2048, 4096], help="k values")
  p.add_argument("--draws", type=int, default=10, help="K fixed draws")
  p.add_argument("--reps", type=int, default=3, help="interleaved timed reps (featurize)")
  p.add_argument("--ekfac-n", type=int, default=1000, help="training examples of EK-FAC")
  p.add_argument("--ekfac-q", type=int, default=100, help="queries of EK-FAC")
  p.add_argument("--ekfac-batch", type=int, default=64, help="examples per batch (both tools)")
  p.add_argument("--ekfac-reps", type=int, default=2, help="interleaved timed reps (EK-FAC)")
  p.add_argument("--quick", action="store_true",
                 help="N = 64, C = 32, k = 1024, EK-FAC N = 64, Q = 8, 1 rep")
  p.add_argument("--report-only", metavar="JSON")
  p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
  args = p.parse_args(argv)
  if args.report_only:
    print(report(json.loads(pathlib.Path(args.report_only).read_text())))
    return 0
  torch = import_peers()
  if args.quick:
    args.n, args.chunk, args.dims, args.reps = 64, 32, [1024], 1
    args.ekfac_n, args.ekfac_q, args.ekfac_batch, args.ekfac_reps = 64, 8, 16, 1
  sections = args.sections.split(",")
  res = {"env": env_record(args), "torch": torch.__version__,
         "torch_threads": torch.get_num_threads()}
  t0 = time.perf_counter()
  jax_params = conv4_init(jax.random.key(0))
  model = torch_model(jax_params)
  schedule = schedules.linear(T)
  draws = fixed_draws(jax.random.key(0), args.draws, (8, 8, 1), T)
  res["port"] = check_port(jax_params, model, schedule, draws, load_digits().x[:8])
  clock = CompileClock()
  if "featurize" in sections:
    res["featurize"] = featurize_section(args, jax_params, model, schedule, draws, clock)
  if "ekfac" in sections:
    res["ekfac"] = ekfac_section(args, jax_params, model, schedule, draws, clock)
  res["env"]["load_after"] = [round(v, 2) for v in os.getloadavg()]
  write_results(res, args.out, report, t0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
