"""Featurisation time on the digits LDS benchmark: dense vs structured projection.

Times each harness featuriser (``jattr.bench.gradient_methods``) on the cache's 200
training images, in one process: the first call (compile + run) and the median of
three later calls, wall and process CPU seconds. Results: docs/trak.md,
*Structured projection on the UNet*.

    python experiments/digits_lds/structured_timing.py loss
    python experiments/digits_lds/structured_timing.py square_norm
"""

import sys
import time

import numpy as np

from jattr import bench
from jattr.bench import gradient_methods as gm

FEATURIZERS = {
    "dense (all params, k=4096)": lambda cache, m: gm.feature_fn(cache, measurement=m),
    "dense (kernels, k=4096)": lambda cache, m: gm.feature_fn(cache, measurement=m,
                                                              covered="kernels"),
    "structured 20x8 (4160)": lambda cache, m: gm.structured_feature_fn(cache, measurement=m),
    "structured 12x12 (3744)": lambda cache, m: gm.structured_feature_fn(
        cache, measurement=m, dim_in=12, dim_out=12),
}


def timed(f, images):
  wall, cpu = time.perf_counter(), time.process_time()
  out = np.asarray(f(images))
  return out, time.perf_counter() - wall, time.process_time() - cpu


def main(measurement: str) -> None:
  config = bench.load_config("experiments/digits_lds/config_digits.json")
  cache = bench.build_cache(config)
  images = cache.train_images
  for name, make in FEATURIZERS.items():
    f = make(cache, measurement)
    phi, first_wall, first_cpu = timed(f, images)
    later = [timed(f, images)[1:] for _ in range(3)]
    wall, cpu = (sorted(column)[1] for column in zip(*later))
    print(f"{measurement} | {name} | {phi.shape} | first call {first_wall:.1f} s wall "
          f"({first_cpu:.1f} s CPU) | steady median of 3: {wall:.2f} s wall ({cpu:.2f} s CPU)",
          flush=True)


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "loss")
