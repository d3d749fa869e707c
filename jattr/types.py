"""The model contract shared across jattr.

The core never assumes a particular network: a model enters as

    apply_fn(params, x_t, t) -> out        x_t: [B, H, W, C], t: [B] int, out: [B, H, W, C]

plus a params pytree. ``out`` is read as ε (default), x₀ or v according to the
``parameterization`` argument of the loss and sampler functions.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax

Params = Any
"""Any pytree of arrays."""

ApplyFn = Callable[[Params, jax.Array, jax.Array], jax.Array]
"""``apply_fn(params, x_t [B,H,W,C], t [B]) -> prediction [B,H,W,C]``."""

Parameterization = Literal["eps", "x0", "v"]
