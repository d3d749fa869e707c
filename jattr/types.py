"""The model contract shared across jattr.

The core never assumes a particular network: a model enters as

    apply_fn(params, x_t, t) -> out        x_t: [B, H, W, C], t: [B] int, out: [B, H, W, C]

plus a params pytree, or, for a conditional model (class labels, text embeddings),

    apply_fn(params, x_t, t, cond) -> out  cond: any pytree, every leaf with leading axis B

whose training examples are pairs ``(x0, cond)`` (``jattr.diffusion.conditioning``).
``out`` is read as ε (default), x₀ or v according to the ``parameterization``
argument of the loss and sampler functions; it must have x_t's shape.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax

Params = Any
"""Any pytree of arrays."""

ApplyFn = Callable[..., jax.Array]
"""``apply_fn(params, x_t [B,H,W,C], t [B]) -> prediction [B,H,W,C]``, or
``apply_fn(params, x_t, t, cond)`` for a conditional model."""

Parameterization = Literal["eps", "x0", "v"]
