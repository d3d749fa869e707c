"""A small DDPM-style UNet in flax NNX.

The network maps a noisy batch and its timesteps (and, for a conditional config, a
condition) to a prediction of the same shape,

    UNet(x_t [B, H, W, C], t [B] int) -> [B, H, W, C]
    UNet(x_t, t, cond) -> [B, H, W, C]          (num_classes or cond_dim set),

and is built from the pieces of Ho et al. (2020), kept deliberately plain:

* timestep t → sinusoidal features (``base_channels`` of them) → Linear → SiLU →
  Linear, giving an embedding of size ``time_embed_dim``;
* residual blocks GroupNorm → SiLU → Conv3×3, plus Linear(SiLU(embedding)) added per
  channel, then GroupNorm → SiLU → Conv3×3, with a 1×1 conv on the skip path when the
  channel count changes;
* one level per entry of ``channel_mults``: ``num_res_blocks`` residual blocks (each
  followed by self-attention if the level's spatial size is in
  ``attn_resolutions``), then a strided 3×3 conv halving H and W (except at the last
  level). The level's output is kept as a skip connection;
* a middle section ResBlock → (attention) → ResBlock at the lowest resolution;
* the mirror path: concatenate the skip of the level, ``num_res_blocks`` residual
  blocks, nearest-neighbour ×2 upsampling followed by a 3×3 conv;
* GroupNorm → SiLU → Conv3×3 back to C channels.

Conditioning (``jattr.diffusion.conditioning`` is the contract), both optional and
available at every preset (``digits_config(num_classes=10)``):

* class labels (``num_classes = K``): a table E of K + 1 learned rows of size
  ``temb_dim``; label y ∈ {0, …, K−1} adds its row to the timestep embedding,

      emb = MLP(sin(t)) + E[y],

  so every residual block sees it through its per-channel projection (as in
  Dhariwal & Nichol 2021). Row K is the *null class* ∅: the label that stands for "no
  condition", trained by condition dropout and used by classifier-free guidance
  (Ho & Salimans 2022; ``jattr.models.bridge.null_condition``).
* a sequence of embeddings c [B, L, ``cond_dim``] (text-like conditioning): every
  attention block at ``attn_resolutions`` is followed by cross-attention from the
  feature map to the sequence (Rombach et al. 2022), with a residual:

      h ← h + W_o softmax(Q Kᵀ/√d) V,   Q = GroupNorm(h) W_q,  K = c W_k,  V = c W_v,

  per head, queries at the H·W positions, keys and values at the L tokens. The null
  context is a sequence of zeros: all its keys are equal, so the attention is the
  uniform average of equal values, and the result does not depend on L.

With both, the condition is the dict ``{"label": [B] int, "context": [B, L, cond_dim]}``.
With neither (the default) the network, its parameters and its outputs are exactly
the unconditional ones.

Attribution needs every example's output to depend on that example only (per-example
gradients, vmap over examples), so there is no BatchNorm, no dropout and no state
other than ``nnx.Param``: GroupNorm statistics are computed per example.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jattr.models.conv import im2col_conv


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Static description of a UNet; frozen, so it is hashable and jit-static.

  Attributes:
    image_shape: (H, W, C) of one image. H and W must be divisible by
      ``2 ** (len(channel_mults) - 1)``, the total downsampling factor.
    base_channels: channels of the first level; level i has
      ``base_channels * channel_mults[i]``.
    channel_mults: one multiplier per resolution level.
    num_res_blocks: residual blocks per level, on each of the down and up paths.
    attn_resolutions: spatial sizes (image height at that level) after whose
      residual blocks a self-attention block is added, e.g. ``(4,)``; each must be
      the height of some level.
    num_groups: GroupNorm groups; must divide every level's channel count.
    time_embed_dim: size of the timestep embedding; ``None`` means
      ``4 * base_channels``.
    num_heads: attention heads; must divide the channel count at every attention
      level.
    conv_impl: how convolutions run: ``"xla"`` (``lax.conv_general_dilated``),
      ``"im2col"`` (``jattr.models.conv.im2col_conv``, patches × matrix), or
      ``"auto"``: im2col on CPU, where native conv gradients are ~25× slower inside
      loops (training segments, ``train_many``), xla elsewhere. Parameters are the
      same either way, so checkpoints move freely between backends.
    num_classes: class-conditional with K = ``num_classes`` classes (``None``: no
      labels). The label table has K + 1 rows; label K is the null class.
    cond_dim: size of each embedding of a conditioning sequence [B, L, cond_dim],
      read by cross-attention after every attention block (``None``: none). Needs
      at least one ``attn_resolutions`` entry.
  """

  image_shape: tuple[int, int, int]
  base_channels: int = 32
  channel_mults: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  attn_resolutions: tuple[int, ...] = ()
  num_groups: int = 8
  time_embed_dim: int | None = None
  num_heads: int = 1
  conv_impl: str = "auto"
  num_classes: int | None = None
  cond_dim: int | None = None

  def __post_init__(self):
    # Lists are accepted for convenience but stored as tuples so the config stays hashable.
    for name in ("image_shape", "channel_mults", "attn_resolutions"):
      object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
    if len(self.image_shape) != 3 or min(self.image_shape) < 1:
      raise ValueError(f"image_shape must be (H, W, C) with positive entries, "
                       f"got {self.image_shape}")
    if not self.channel_mults or min(self.channel_mults) < 1:
      raise ValueError(f"channel_mults must be a non-empty tuple of positive ints, "
                       f"got {self.channel_mults}")
    h, w, _ = self.image_shape
    factor = 2 ** (len(self.channel_mults) - 1)
    if h % factor or w % factor:
      raise ValueError(
          f"image_shape {self.image_shape}: H and W must be divisible by 2**(len(channel_mults)-1)"
          f" = {factor} for channel_mults={self.channel_mults}; use fewer levels")
    if self.base_channels < 1 or self.num_res_blocks < 1 or self.num_heads < 1:
      raise ValueError(f"base_channels, num_res_blocks and num_heads must be >= 1, got "
                       f"{self.base_channels}, {self.num_res_blocks}, {self.num_heads}")
    if self.conv_impl not in ("auto", "xla", "im2col"):
      raise ValueError(f"conv_impl must be 'auto', 'xla' or 'im2col', got {self.conv_impl!r}")
    if self.time_embed_dim is not None and self.time_embed_dim < 1:
      raise ValueError(f"time_embed_dim must be None or >= 1, got {self.time_embed_dim}")
    for name in ("num_classes", "cond_dim"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < 1):
        raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    if self.cond_dim is not None and not self.attn_resolutions:
      raise ValueError(f"cond_dim={self.cond_dim} needs cross-attention, which sits at the "
                       f"attention levels, but attn_resolutions is empty; add a resolution "
                       f"of {self.resolutions} to attn_resolutions")
    for ch in self.channels:
      if ch % self.num_groups:
        raise ValueError(f"num_groups={self.num_groups} must divide every level's channel count "
                         f"base_channels*channel_mults = {self.channels}")
    for r in self.attn_resolutions:
      if r not in self.resolutions:
        raise ValueError(f"attn_resolutions entry {r} is not the height of any level; "
                         f"the levels have heights {self.resolutions}")
      ch = self.channels[self.resolutions.index(r)]
      if ch % self.num_heads:
        raise ValueError(f"num_heads={self.num_heads} must divide the {ch} channels of the "
                         f"attention level at resolution {r}")

  @property
  def channels(self) -> tuple[int, ...]:
    """Channel count of each level."""
    return tuple(self.base_channels * m for m in self.channel_mults)

  @property
  def resolutions(self) -> tuple[int, ...]:
    """Height of each level."""
    return tuple(self.image_shape[0] // 2**i for i in range(len(self.channel_mults)))

  @property
  def temb_dim(self) -> int:
    """The resolved timestep-embedding size."""
    return self.time_embed_dim or 4 * self.base_channels

  @property
  def conditional(self) -> bool:
    """True when the network takes a condition (``num_classes`` or ``cond_dim`` set)."""
    return self.num_classes is not None or self.cond_dim is not None


def digits_config(**overrides) -> UNetConfig:
  """8×8×1 (sklearn digits): 185k parameters; a gradient on a batch of 64 takes ~30 ms on CPU.

  Both levels keep 32 channels: doubling them at 4×4 would almost triple the
  parameter count (to ~510k) for little gain on 8×8 images. ``overrides`` replace
  fields, as in every preset: ``digits_config(num_classes=10)`` is the
  class-conditional model.
  """
  return _preset(dict(image_shape=(8, 8, 1), base_channels=32, channel_mults=(1, 1),
                      num_res_blocks=1, attn_resolutions=(4,), time_embed_dim=64), overrides)


def fashion_mnist_config(**overrides) -> UNetConfig:
  """28×28×1 (MNIST / Fashion-MNIST): levels at 28, 14, 7, attention at 7."""
  return _preset(dict(image_shape=(28, 28, 1), base_channels=32, channel_mults=(1, 2, 2),
                      num_res_blocks=2, attn_resolutions=(7,)), overrides)


def cifar_config(**overrides) -> UNetConfig:
  """32×32×3 (CIFAR-10), a few million parameters."""
  return _preset(dict(image_shape=(32, 32, 3), base_channels=64, channel_mults=(1, 2, 2),
                      num_res_blocks=2, attn_resolutions=(16,)), overrides)


def cifar_30m_config(**overrides) -> UNetConfig:
  """32×32×3 with ~30M parameters, the size of the DDPM CIFAR-10 model; for memory benchmarks."""
  return _preset(dict(image_shape=(32, 32, 3), base_channels=160, channel_mults=(1, 2, 2),
                      num_res_blocks=2, attn_resolutions=(16,), num_groups=32), overrides)


def _preset(fields: dict, overrides: dict) -> UNetConfig:
  """A preset's fields with ``overrides`` (any ``UNetConfig`` field) replacing them."""
  unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(UNetConfig)})
  if unknown:
    raise TypeError(f"unknown UNetConfig fields {unknown}")
  return UNetConfig(**{**fields, **overrides})


_PRESETS = {
    "digits": digits_config,
    "fashion_mnist": fashion_mnist_config,
    "cifar": cifar_config,
    "cifar_30m": cifar_30m_config,
}


def config_record(config: UNetConfig) -> dict:
  """The config as a JSON-able dict, the conditioning fields left out while unset, so
  that the records of unconditional models (run configs, feature stores, curvature
  files) read as they did before conditioning existed."""
  d = dataclasses.asdict(config)
  for name in ("num_classes", "cond_dim"):
    if d[name] is None:
      del d[name]
  return d


def config_by_name(name: str, **overrides) -> UNetConfig:
  """The preset called ``name``: one of ``digits``, ``fashion_mnist``, ``cifar``, ``cifar_30m``;
  ``overrides`` replace fields (``config_by_name("digits", num_classes=10)``)."""
  if name not in _PRESETS:
    raise ValueError(f"unknown UNet preset {name!r}; expected one of {sorted(_PRESETS)}")
  return _PRESETS[name](**overrides)


def timestep_embedding(t: jax.Array, dim: int, dtype, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of integer timesteps (Vaswani et al. 2017; Ho et al. 2020).

      emb(t) = [sin(t ω_0), …, sin(t ω_{d/2−1}), cos(t ω_0), …],   ω_k = max_period^(−k/(d/2))

  Args:
    t: timesteps, shape [B].
    dim: number of features; an odd ``dim`` gets a trailing zero.
    dtype: dtype of the result (the dtype of the network input).

  Returns:
    Features of shape [B, dim].
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=dtype) / max(half, 1))
  angles = t.astype(dtype)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


def resolve_conv_impl(conv_impl: str) -> str:
  """``"auto"`` → ``"im2col"`` on the CPU backend, ``"xla"`` on GPU/TPU."""
  if conv_impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "xla"
  return conv_impl


def _conv(in_ch: int, out_ch: int, kernel: tuple[int, int], impl: str, *, rngs: nnx.Rngs,
          strides: tuple[int, int] = (1, 1)) -> nnx.Conv:
  fn = im2col_conv if resolve_conv_impl(impl) == "im2col" else jax.lax.conv_general_dilated
  return nnx.Conv(in_ch, out_ch, kernel, strides=strides, conv_general_dilated=fn, rngs=rngs)


def _norm(channels: int, num_groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Two-pass variance: the one-pass E[x²]−E[x]² form loses digits that float64
  # reference checks of gradients and curvature would otherwise notice.
  return nnx.GroupNorm(channels, num_groups=min(num_groups, channels), use_fast_variance=False,
                       rngs=rngs)


class ResBlock(nnx.Module):
  """GroupNorm → SiLU → Conv3×3 (+ time embedding) → GroupNorm → SiLU → Conv3×3, plus skip."""

  def __init__(self, in_channels: int, out_channels: int, temb_dim: int, num_groups: int,
               conv_impl: str = "auto", *, rngs: nnx.Rngs):
    self.norm1 = _norm(in_channels, num_groups, rngs)
    self.conv1 = _conv(in_channels, out_channels, (3, 3), conv_impl, rngs=rngs)
    self.temb_proj = nnx.Linear(temb_dim, out_channels, rngs=rngs)
    self.norm2 = _norm(out_channels, num_groups, rngs)
    self.conv2 = _conv(out_channels, out_channels, (3, 3), conv_impl, rngs=rngs)
    self.skip = (_conv(in_channels, out_channels, (1, 1), conv_impl, rngs=rngs)
                 if in_channels != out_channels else None)

  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    """x [B, H, W, in], temb [B, temb_dim] -> [B, H, W, out]."""
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = h + self.temb_proj(nnx.silu(temb))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    return h + (x if self.skip is None else self.skip(x))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q kᵀ/√d) v per head: q [B, N, heads, d], k and v [B, M, heads, d] -> q's shape."""
  d = q.shape[-1]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(d, q.dtype))
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


class CrossAttention(nnx.Module):
  """Multi-head attention from the H·W positions to a context sequence, with a residual.

  Queries from GroupNorm(x), keys and values from the context [B, L, cond_dim].
  """

  def __init__(self, channels: int, cond_dim: int, num_heads: int, num_groups: int, *,
               rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.norm = _norm(channels, num_groups, rngs)
    self.q = nnx.Linear(channels, channels, rngs=rngs)
    self.kv = nnx.Linear(cond_dim, 2 * channels, rngs=rngs)
    self.proj = nnx.Linear(channels, channels, rngs=rngs)

  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    """x [B, H, W, C], context [B, L, cond_dim] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    d = c // self.num_heads
    q = self.q(self.norm(x)).reshape(b, h * w, self.num_heads, d)
    kv = self.kv(context.astype(x.dtype)).reshape(b, context.shape[1], 2, self.num_heads, d)
    out = _attend(q, kv[:, :, 0], kv[:, :, 1])
    return x + self.proj(out.reshape(b, h, w, c))


class AttentionBlock(nnx.Module):
  """Multi-head self-attention over the H·W positions of each image, with a residual;
  followed by cross-attention to the context (``CrossAttention``) when ``cond_dim`` is set."""

  def __init__(self, channels: int, num_heads: int, num_groups: int,
               cond_dim: int | None = None, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.norm = _norm(channels, num_groups, rngs)
    self.qkv = nnx.Linear(channels, 3 * channels, rngs=rngs)
    self.proj = nnx.Linear(channels, channels, rngs=rngs)
    self.cross = (CrossAttention(channels, cond_dim, num_heads, num_groups, rngs=rngs)
                  if cond_dim is not None else None)

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x [B, H, W, C] (context [B, L, cond_dim] when cross-attending) -> [B, H, W, C]."""
    b, h, w, c = x.shape
    d = c // self.num_heads
    qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3, self.num_heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, d]
    x = x + self.proj(_attend(q, k, v).reshape(b, h, w, c))
    if self.cross is not None:
      x = self.cross(x, context)
    return x


class Downsample(nnx.Module):
  """Strided 3×3 conv: [B, H, W, C] -> [B, H/2, W/2, C]."""

  def __init__(self, channels: int, conv_impl: str = "auto", *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, (3, 3), conv_impl, strides=(2, 2), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour ×2 then 3×3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""

  def __init__(self, channels: int, conv_impl: str = "auto", *, rngs: nnx.Rngs):
    self.conv = _conv(channels, channels, (3, 3), conv_impl, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """``num_blocks`` ResBlocks at one resolution, each optionally followed by attention."""

  def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool,
               config: UNetConfig, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([
        ResBlock(in_channels if i == 0 else out_channels, out_channels, config.temb_dim,
                 config.num_groups, config.conv_impl, rngs=rngs) for i in range(num_blocks)])
    self.attns = nnx.List([
        AttentionBlock(out_channels, config.num_heads, config.num_groups, config.cond_dim,
                       rngs=rngs)
        for _ in range(num_blocks if attention else 0)])

  def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None
               ) -> jax.Array:
    for i, block in enumerate(self.blocks):
      x = block(x, temb)
      if self.attns:
        x = self.attns[i](x, context)
    return x


class UNet(nnx.Module):
  """The denoising network ``(x_t [B,H,W,C], t [B][, cond]) -> [B,H,W,C]``; see the module
  docstring.

  Args:
    config: the architecture.
    rngs: initialisation randomness, for flax's per-layer initialisers. The bridge
      (``jattr.models.make_model`` / ``make_init_fn``) instead draws all kernels at
      once, from the same distributions, because that compiles much faster.

  Example:
    >>> model = UNet(digits_config(), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1)), jnp.array([0, 999])).shape
    (2, 8, 8, 1)
    >>> model = UNet(digits_config(num_classes=10), rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 8, 8, 1)), jnp.array([0, 999]), jnp.array([3, 10])).shape
    (2, 8, 8, 1)
  """

  def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, UNetConfig):
      raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
    self.config = config
    chs, res = config.channels, config.resolutions
    attn = [r in config.attn_resolutions for r in res]
    nb = config.num_res_blocks

    self.time_fc1 = nnx.Linear(config.base_channels, config.temb_dim, rngs=rngs)
    self.time_fc2 = nnx.Linear(config.temb_dim, config.temb_dim, rngs=rngs)
    if config.num_classes is not None:  # row num_classes: the null class
      self.class_embed = nnx.Embed(config.num_classes + 1, config.temb_dim, rngs=rngs)
    impl = config.conv_impl
    self.conv_in = _conv(config.image_shape[2], chs[0], (3, 3), impl, rngs=rngs)

    self.down = nnx.List()
    self.downsample = nnx.List()
    ch = chs[0]
    for i, c in enumerate(chs):
      self.down.append(Level(ch, c, nb, attn[i], config, rngs=rngs))
      ch = c
      if i < len(chs) - 1:
        self.downsample.append(Downsample(ch, impl, rngs=rngs))

    self.mid1 = ResBlock(ch, ch, config.temb_dim, config.num_groups, impl, rngs=rngs)
    self.mid_attn = (AttentionBlock(ch, config.num_heads, config.num_groups, config.cond_dim,
                                    rngs=rngs)
                     if attn[-1] else None)
    self.mid2 = ResBlock(ch, ch, config.temb_dim, config.num_groups, impl, rngs=rngs)

    # Stored in the order they run: lowest resolution first.
    self.up = nnx.List()
    self.upsample = nnx.List()
    for i in reversed(range(len(chs))):
      self.up.append(Level(ch + chs[i], chs[i], nb, attn[i], config, rngs=rngs))
      ch = chs[i]
      if i > 0:
        self.upsample.append(Upsample(ch, impl, rngs=rngs))

    self.norm_out = _norm(ch, config.num_groups, rngs)
    self.conv_out = _conv(ch, config.image_shape[2], (3, 3), impl, rngs=rngs)

  def __call__(self, x: jax.Array, t: jax.Array, cond=None) -> jax.Array:
    """Predicts ε (or x₀, v) for each example.

    Args:
      x: noisy images [B, H, W, C], in the dtype of the parameters.
      t: integer timesteps [B].
      cond: the condition of each example, required exactly when the config is
        conditional: int labels [B] in [0, num_classes] (num_classes = the null
        class) for ``num_classes``; the context [B, L, cond_dim] for ``cond_dim``;
        ``{"label": ..., "context": ...}`` for both.

    Returns:
      [B, H, W, C], same dtype as the computation (the promotion of x and params).
    """
    expected = self.config.image_shape
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
      raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {x.shape}")
    if t.shape != x.shape[:1]:
      raise ValueError(f"t must have shape [B]={x.shape[:1]}, got {t.shape}")
    label, context = self._split_cond(cond, x.shape[0])

    temb = timestep_embedding(t, self.config.base_channels, x.dtype)
    temb = self.time_fc2(nnx.silu(self.time_fc1(temb)))
    if label is not None:
      temb = temb + self.class_embed(label).astype(temb.dtype)

    h = self.conv_in(x)
    skips = []
    for i, level in enumerate(self.down):
      h = level(h, temb, context)
      skips.append(h)
      if i < len(self.downsample):
        h = self.downsample[i](h)

    h = self.mid1(h, temb)
    if self.mid_attn is not None:
      h = self.mid_attn(h, context)
    h = self.mid2(h, temb)

    for i, level in enumerate(self.up):
      h = level(jnp.concatenate([h, skips.pop()], axis=-1), temb, context)
      if i < len(self.upsample):
        h = self.upsample[i](h)

    return self.conv_out(nnx.silu(self.norm_out(h)))

  def _split_cond(self, cond, batch: int) -> tuple[jax.Array | None, jax.Array | None]:
    """``(label [B] or None, context [B, L, cond_dim] or None)``, their shapes checked."""
    config = self.config
    if not config.conditional:
      if cond is not None:
        raise ValueError("this UNet is unconditional (num_classes and cond_dim are None) but "
                         "was given a condition; set num_classes or cond_dim in its config")
      return None, None
    if cond is None:
      raise ValueError("this UNet is conditional and needs cond (for no condition, pass "
                       "jattr.models.bridge.null_condition(config, batch))")
    if config.num_classes is not None and config.cond_dim is not None:
      if not isinstance(cond, dict) or set(cond) != {"label", "context"}:
        raise ValueError("with both num_classes and cond_dim, cond must be the dict "
                         "{'label': [B] int, 'context': [B, L, cond_dim]}, got "
                         f"{type(cond).__name__}"
                         f"{' with keys ' + str(sorted(cond)) if isinstance(cond, dict) else ''}")
      label, context = cond["label"], cond["context"]
    elif config.num_classes is not None:
      label, context = cond, None
    else:
      label, context = None, cond
    if label is not None:
      label = jnp.asarray(label)
      if label.shape != (batch,) or not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(f"class labels must be integers of shape [B]=({batch},), got "
                         f"{label.dtype} of shape {label.shape}")
    if context is not None:
      context = jnp.asarray(context)
      if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != config.cond_dim:
        raise ValueError(f"the context must have shape [B={batch}, L, cond_dim="
                         f"{config.cond_dim}], got {context.shape}")
    return label, context
