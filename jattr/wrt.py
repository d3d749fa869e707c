"""``wrt``: the parameters to attribute with, and the model restricted to them.

Attribution is usually taken with respect to a subset of a model's parameters: the
LoRA adapter of a fine-tuned model (the D-TRAK paper's Stable Diffusion results), the
last layers of a large network, or everything but the normalisation scales. A
selector names that subset:

- ``None``: every leaf;
- a ``str``: a regular expression, kept where ``re.search(regex, path)`` matches the
  leaf's path (``"lora"``, ``"^up/"``, ``"kernel$"``);
- a callable ``path -> bool``;
- a boolean mask pytree with the structure of ``params`` (``True``: selected).

A leaf's *path* joins its keys with ``/``: ``{"down": [{"conv": {"kernel": w}}]}``
gives ``"down/0/conv/kernel"`` (dict keys, sequence indices and attribute names, as
``jax.tree_util.tree_flatten_with_path`` gives them; ``param_paths`` lists them).

``restrict`` turns ``(apply_fn, params, wrt)`` into ``(apply_sub, sub)``: ``sub``
holds the selected leaves (the other leaves become ``None``, so ``sub`` keeps the
paths of ``params``) and ``apply_sub(sub, *args) = apply_fn(merge(sub), *args)`` with
the frozen leaves held fixed. Every method run on ``(apply_sub, sub)`` differentiates
only the selected leaves; this is how the library's ``wrt=`` arguments are built.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Callable, Sequence, Union

import jax
import numpy as np

Params = Any
"""A params pytree (``jattr.types.Params``; restated here: ``wrt`` sits at rank 0 of
the layering, beside ``types``, and imports no other jattr module)."""

Selector = Union[None, str, Callable[[str], bool], Any]
"""None (all), a path regex, a predicate on the path, or a boolean mask pytree."""


def _key_str(key) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple) -> str:
  """A ``tree_flatten_with_path`` key path as ``"a/b/0/kernel"``."""
  return "/".join(_key_str(k) for k in path)


def param_paths(params: Params) -> list[str]:
  """The path of every leaf of ``params``, in ``jax.tree.leaves`` order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [path_str(path) for path, _ in flat]


def describe(wrt: Selector) -> str | None:
  """A JSON-able description of a selector: the regex, ``"<callable>"``, ``"<mask>"``."""
  if wrt is None or isinstance(wrt, str):
    return wrt
  return "<callable>" if callable(wrt) else "<mask>"


def select_names(names: Sequence[str], wrt: Selector, *, what: str = "parameter leaves"
                 ) -> tuple[bool, ...]:
  """One bool per name: does the regex (``re.search``) or predicate ``wrt`` keep it?

  The name-based half of ``select``, for selectors applied to other names than leaf
  paths (``jattr.features.structured_featurize`` selects layers by their ``layer``
  name). ``None`` keeps every name; a mask pytree is refused (there is no tree).

  Raises:
    ValueError: a regex that does not compile, or a selector that keeps no name.
    TypeError: a selector that is neither None, a str nor a callable.
  """
  names = list(names)
  if wrt is None:
    chosen = tuple(True for _ in names)
  elif isinstance(wrt, str):
    pattern = _compile(wrt)
    chosen = tuple(bool(pattern.search(n)) for n in names)
  elif callable(wrt):
    chosen = tuple(bool(wrt(n)) for n in names)
  else:
    raise TypeError(f"wrt must be None, a regex str or a predicate on the {what}' names here, "
                    f"got {type(wrt).__name__}")
  _check_some(chosen, names, wrt, what)
  return chosen


def _compile(regex: str) -> re.Pattern:
  try:
    return re.compile(regex)
  except re.error as e:
    raise ValueError(f"wrt={regex!r} is not a valid regular expression: {e}") from None


def _check_some(chosen, names, wrt, what):
  if names and not any(chosen):
    raise ValueError(f"wrt={describe(wrt)!r} matches no parameter: it selects none of the "
                     f"{len(names)} {what}; {what} look like {names[:4]}")


def select(params: Params, wrt: Selector) -> tuple[bool, ...]:
  """One bool per leaf of ``params`` (``jax.tree.leaves`` order): is it selected?

  Raises:
    ValueError: a regex that does not compile, a mask whose structure differs from
      ``params``, or a selector that selects no leaf (naming a few paths).
    TypeError: a selector of another type, or a mask with non-bool leaves.
  """
  paths = param_paths(params)
  if wrt is None or isinstance(wrt, str) or callable(wrt):
    return select_names(paths, wrt)
  mask_leaves, mask_def = jax.tree.flatten(wrt)
  if not all(isinstance(m, (bool, np.bool_)) for m in mask_leaves):
    raise TypeError("wrt must be None, a regex str, a predicate on the path or a mask pytree "
                    "of Python bools; got a "
                    f"{type(wrt).__name__} with leaves of types "
                    f"{sorted({type(m).__name__ for m in mask_leaves})}")
  if mask_def != jax.tree.structure(params):
    raise ValueError("a wrt mask must have the tree structure of params, got "
                     f"{mask_def} for params {jax.tree.structure(params)}")
  chosen = tuple(bool(m) for m in mask_leaves)
  _check_some(chosen, paths, wrt, "parameter leaves")
  return chosen


def selected_paths(params: Params, wrt: Selector) -> list[str]:
  """The paths ``wrt`` selects, in leaf order."""
  return [p for p, keep in zip(param_paths(params), select(params, wrt)) if keep]


def selection_hash(params: Params, wrt: Selector) -> str:
  """sha256 of the selected paths: equal for any two selectors choosing the same leaves."""
  return hashlib.sha256("\n".join(selected_paths(params, wrt)).encode()).hexdigest()


def selection_summary(params: Params, wrt: Selector) -> dict | None:
  """What ``wrt`` selects, as JSON (``None`` for ``wrt=None``): ``selector``
  (``describe``), ``selection_sha256`` (``selection_hash``), and the ``num_leaves``
  and ``num_parameters`` selected. The files made with a selection record it
  (``jattr.runs.selection_record`` adds the hash of the frozen leaves).
  """
  if wrt is None:
    return None
  chosen = select(params, wrt)
  sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
  return {"selector": describe(wrt), "selection_sha256": selection_hash(params, wrt),
          "num_leaves": int(sum(chosen)),
          "num_parameters": int(sum(n for n, c in zip(sizes, chosen) if c))}


def complement(params: Params, wrt: Selector) -> Params | None:
  """The frozen part: ``params`` with the *selected* leaves replaced by ``None``
  (``None`` when every leaf is selected)."""
  chosen = select(params, wrt)
  if all(chosen):
    return None
  rest = iter(chosen)
  return jax.tree.map(lambda x: None if next(rest) else x, params)


def split(params: Params, wrt: Selector) -> Params:
  """``sub``: ``params`` with every leaf ``wrt`` does not select replaced by ``None``."""
  chosen = iter(select(params, wrt))
  return jax.tree.map(lambda x: x if next(chosen) else None, params)


def merge(params: Params, sub: Params, wrt: Selector | tuple[bool, ...]) -> Params:
  """``params`` with its selected leaves replaced by those of ``sub`` (inverse of ``split``).

  ``wrt`` is the selector of ``split`` or the tuple ``select`` returned.
  """
  chosen = wrt if isinstance(wrt, tuple) and all(isinstance(c, bool) for c in wrt) \
      else select(params, wrt)
  leaves, treedef = jax.tree.flatten(params)
  new = jax.tree.leaves(sub)
  if len(new) != sum(chosen):
    raise ValueError(f"sub has {len(new)} leaves; the selector chose {sum(chosen)}")
  it = iter(new)
  return jax.tree.unflatten(treedef, [next(it) if c else x for x, c in zip(leaves, chosen)])


class Restricted:
  """``apply_sub(sub, *args, **kw) = apply_fn(merge(params, sub), *args, **kw)``.

  The frozen leaves are held by the object (closed over, not differentiated; under
  ``jax.jit`` they enter as constants, which jit passes to the compiled program as
  arguments, not embedded in it). ``base``, ``chosen`` and ``paths`` say what it
  was built from.

  Two ``Restricted`` are equal (and hash alike) when they wrap equal functions with
  the same selection and the *same* frozen leaf objects (``is``): the library's
  chunk kernels are ``jax.jit`` static arguments, so restricting the same model
  twice (once per store chunk, train then queries) reuses one compiled program,
  while a model whose frozen leaves are other arrays compiles anew. (Mutating a
  frozen numpy leaf in place is not seen: pass new arrays.)
  """

  def __init__(self, fn: Callable, params: Params, chosen: tuple[bool, ...]):
    self.fn, self.base, self.chosen = fn, params, tuple(chosen)
    self.paths = tuple(p for p, c in zip(param_paths(params), chosen) if c)
    self._frozen = tuple(x for x, c in zip(jax.tree.leaves(params), self.chosen) if not c)
    self._treedef = jax.tree.structure(params)

  def __call__(self, sub, *args, **kwargs):
    return self.fn(merge(self.base, sub, self.chosen), *args, **kwargs)

  def __eq__(self, other):
    return (type(other) is Restricted and self.chosen == other.chosen
            and self._treedef == other._treedef and len(self._frozen) == len(other._frozen)
            and all(a is b for a, b in zip(self._frozen, other._frozen)) and self.fn == other.fn)

  def __hash__(self):
    return hash((self.fn, self.chosen, tuple(id(x) for x in self._frozen)))

  def __repr__(self):
    return f"Restricted({self.fn!r}, {len(self.paths)} selected leaves)"


def restrict(fn: Callable, params: Params, wrt: Selector) -> tuple[Callable, Params]:
  """``(fn_sub, sub)``: ``fn`` as a function of the selected leaves only.

  ``fn`` is any function whose first argument is the params pytree
  (``apply_fn(params, x_t, t)``, a per-example ``fn(params, example)``). With
  ``wrt=None`` it returns ``(fn, params)`` unchanged, so a method given ``wrt=None``
  computes exactly what it did without the argument.

  Example:
    >>> apply_sub, sub = restrict(apply_fn, params, "lora")
    >>> phi = featurize(example_fn_of(apply_sub), sub, x0, config)  # LoRA leaves only
  """
  if wrt is None:
    return fn, params
  chosen = select(params, wrt)
  return Restricted(fn, params, chosen), split(params, chosen_mask(params, chosen))


def chosen_mask(params: Params, chosen: tuple[bool, ...]) -> Params:
  """The boolean mask pytree of a ``select`` result."""
  return jax.tree.unflatten(jax.tree.structure(params), list(chosen))
