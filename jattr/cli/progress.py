"""tqdm progress bars for the ``jattr.progress`` protocol: the CLI's only terminal code."""

from __future__ import annotations

from tqdm.auto import tqdm


class TqdmProgress:
  """``progress(desc, done, total, **metrics)`` drawing one tqdm bar per stage.

  A bar opens on the first report of a ``desc``, moves to ``done`` on each report
  (metrics shown as its postfix) and closes when ``done`` reaches ``total``.
  """

  def __init__(self, **tqdm_kwargs):
    self._bars: dict[str, tqdm] = {}
    self._kwargs = tqdm_kwargs

  def __call__(self, desc: str, done: int, total: int, **metrics: float) -> None:
    bar = self._bars.get(desc)
    if bar is None:
      bar = self._bars[desc] = tqdm(total=total, desc=desc, **self._kwargs)
    bar.total = total
    if metrics:  # shown with the update below, not as a refresh of its own
      bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
    bar.update(done - bar.n)
    if done >= total:
      bar.close()
      del self._bars[desc]


def progress_for(args):
  """A ``TqdmProgress`` unless the command was given ``--quiet`` / ``--no-progress``."""
  quiet = getattr(args, "quiet", False) or getattr(args, "no_progress", False)
  return None if quiet else TqdmProgress()
