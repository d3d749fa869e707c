"""Guards at the boundary: inputs checked before any work, outputs before any write.

Config files:

    read_json(path)           JSON, with the file's name (and line, column) in every error
    from_dict(cls, d)         a dataclass from a JSON object: every key checked against the
                              field's annotated type, unknown keys refused with the nearest
                              valid one suggested, nested dataclasses checked the same way
    check_fields(obj)         the same type checks on a constructed dataclass (for
                              ``__post_init__``: a config built in Python is checked too)
    ConfigError               the ValueError they raise: the file, the dotted key, the
                              value and what was expected, in one line

The type rules are JSON's, made strict: ``bool`` is not an integer, an integer field
refuses ``4.5`` (and ``4.0``) and ``"48"``, a number field refuses NaN and infinity,
``X | None`` accepts ``null``, ``Literal[...]`` one of its values, ``tuple[int, ...]``
a list of integers.

Outputs:

    check_writable(path, flag)          the directory (or the nearest folder above it
                                        that exists) can be written
    check_output_file(path, flag, ...)  an .npz a command (re)writes: not a directory,
                                        and if it exists, a jattr file of that kind
    check_output_dir(path, flag, ...)   a directory a command writes into: missing,
                                        empty, or already one of that kind

These raise before anything is written, so a refused command leaves every file as it
was.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import json
import math
import numbers
import os
import pathlib
import types
import typing
from typing import Any, Callable, Iterable

import numpy as np

from jattr.io.lock import LOCK_FILE

_MAX_SHOWN = 60


class ConfigError(ValueError):
  """A config value that is missing, unknown, of the wrong type or out of range.

  Attributes:
    key: the dotted key (``"train.num_steps"``, ``"model.channel_mults[1]"``).
    problem: what is wrong, starting with ``" = VALUE: expected …"`` or ``" is …"``.
    where: the file (or class) the key belongs to, or None.
  """

  def __init__(self, key: str, problem: str, where: str | None = None, *,
               rel: str | None = None):
    self.key, self.problem, self.where = key or "the top level", problem, where
    self.rel = self.key if rel is None else rel  # the key where the error was raised
    super().__init__(key, problem, where)

  def __str__(self) -> str:
    # "{key}" in the problem is the full key, "{prefix}" what lies above the key the
    # error was raised at (so a suggestion made down there reads right up here).
    prefix = self.key[:-len(self.rel)] if self.key.endswith(self.rel) else ""
    if "{key}" in self.problem:
      body = self.problem.replace("{key}", self.key)
    else:
      body = f"{self.key}{self.problem}"
    body = body.replace("{prefix}", prefix)
    return f"{self.where}: {body}" if self.where else body

  def within(self, prefix: str, where: str | None = None) -> "ConfigError":
    """The same error, its key under ``prefix`` and attributed to ``where``."""
    if self.key == "the top level":
      return ConfigError(prefix or self.key, self.problem, where, rel=self.rel)
    return ConfigError(join_key(prefix, self.key), self.problem, where, rel=self.rel)


def join_key(prefix: str, name: str) -> str:
  if not prefix:
    return name
  return f"{prefix}{name}" if name.startswith("[") else f"{prefix}.{name}"


def show(value: Any) -> str:
  """``value`` as JSON text, shortened; strings quoted, so ``"48"`` differs from ``48``."""
  try:
    text = json.dumps(value, allow_nan=True, default=repr)
  except (TypeError, ValueError):
    text = repr(value)
  return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 1] + "…"


def suggest(name: str, choices: Iterable[str]) -> str:
  """``" (did you mean 'x'?)"`` for the nearest of ``choices``, or ``""``."""
  match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
  return f" (did you mean {match[0]!r}?)" if match else ""


def expected(tp: Any) -> str:
  """What a value of annotation ``tp`` looks like, in words."""
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return "any value"
  if tp is type(None) or tp is None:
    return "null"
  if origin in (typing.Union, types.UnionType):
    parts = [expected(a) for a in args if a is not type(None)]
    return ("null or " if type(None) in args else "") + " or ".join(parts)
  if origin is typing.Literal:
    return "one of " + ", ".join(show(a) for a in args)
  if tp is bool:
    return "true or false"
  if tp is int:
    return "an integer"
  if tp is float:
    return "a finite number"
  if tp is str:
    return "a string"
  if origin in (tuple, list) or tp in (tuple, list):
    if origin is tuple and args and args[-1] is not Ellipsis:
      kinds = {expected(a) for a in args}
      if len(kinds) == 1:
        return f"a list of {len(args)} {_plural(kinds.pop())}"
      return "a list [" + ", ".join(expected(a) for a in args) + "]"
    return f"a list of {_plural(expected(args[0]))}" if args else "a list"
  if origin is dict or tp is dict:
    return "an object"
  if dataclasses.is_dataclass(tp):
    return f"an object of {tp.__name__} fields"
  return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
  for article in ("an ", "a "):
    if text.startswith(article):
      return text[len(article):] + "s"
  return text


def _bad(key: str, value: Any, tp: Any, extra: str = "") -> ConfigError:
  return ConfigError(key, f" = {show(value)}: expected {expected(tp)}{extra}")


def check_value(value: Any, tp: Any, key: str, *, build: bool = True) -> Any:
  """``value`` checked against the annotation ``tp``; returns it (lists of a tuple
  field as tuples, objects of a dataclass field as that dataclass when ``build``).

  Raises:
    ConfigError: naming ``key``, the value and what was expected.
  """
  origin, args = typing.get_origin(tp), typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    options = [a for a in args if a is not type(None)]
    errors = []
    for option in options:
      try:
        return check_value(value, option, key, build=build)
      except ConfigError as e:
        errors.append(e)
    deeper = [e for e in errors if e.key != key]
    if deeper:  # e.g. a list item or a nested key: the innermost message says more
      raise deeper[0]
    raise _bad(key, value, tp)
  if origin is typing.Literal:
    if any(value == a and type(value) is type(a) for a in args):
      return value
    hint = suggest(value, [a for a in args if isinstance(a, str)]) if isinstance(value, str) else ""
    raise _bad(key, value, tp, hint)
  if tp is bool:
    if isinstance(value, (bool, np.bool_)):
      return value
    raise _bad(key, value, tp)
  if tp is int:
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
      return value
    raise _bad(key, value, tp)
  if tp is float:
    if (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
        and math.isfinite(value)):
      return value
    raise _bad(key, value, tp)
  if tp is str:
    if isinstance(value, str):
      return value
    raise _bad(key, value, tp)
  if origin in (tuple, list) or tp in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise _bad(key, value, tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
      if len(value) != len(args):
        raise _bad(key, value, tp)
      items = [check_value(v, a, f"{key}[{i}]", build=build)
               for i, (v, a) in enumerate(zip(value, args))]
    elif args:
      items = [check_value(v, args[0], f"{key}[{i}]", build=build) for i, v in enumerate(value)]
    else:
      items = list(value)
    return tuple(items) if (origin is tuple or tp is tuple) else items
  if origin is dict or tp is dict:
    if isinstance(value, dict):
      return value
    raise _bad(key, value, tp)
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if isinstance(value, dict) and build:
      return from_dict(tp, value, key=key)
    raise _bad(key, value, tp)
  if isinstance(tp, type):
    if isinstance(value, tp):
      return value
    raise _bad(key, value, tp)
  return value


def _fields(cls) -> tuple[dict[str, dataclasses.Field], dict[str, Any]]:
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  return fields, typing.get_type_hints(cls)


def _required(f: dataclasses.Field) -> bool:
  return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def check_keys(data: dict, allowed: Iterable[str], *, key: str = "", what: str = "",
               required: Iterable[str] = (), elsewhere: dict[str, Iterable[str]] | None = None,
               hint: dict[str, str] | None = None) -> None:
  """Refuses keys outside ``allowed`` (suggesting the nearest) and missing ``required``.

  Args:
    data: the JSON object.
    allowed: its valid keys.
    key: its own dotted key ("" at the top).
    what: what it is, for the message (e.g. ``"TrainConfig"``).
    required: keys that must be present.
    elsewhere: ``{section: keys}`` of nested sections: a top-level key that belongs
      in one of them is pointed there (``num_steps`` → ``train.num_steps``).
    hint: ``{required key: what it must be}`` for the missing-key message.
  """
  allowed = list(allowed)
  for name in data:
    if name in allowed:
      continue
    section = next((s for s, keys in (elsewhere or {}).items() if name in keys), None)
    match = difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)
    near = (join_key(join_key(key, section), name) if section
            else join_key(key, match[0]) if match else None)
    tip = f" (did you mean '{{prefix}}{near}'?)" if near else ""
    raise ConfigError(join_key(key, str(name)),
                      f"unknown {what + ' ' if what else ''}fields ['{{key}}']{tip}; the "
                      f"fields{' of ' + key if key else ''} are: {', '.join(allowed)}")
  for name in required:
    if name not in data:
      raise ConfigError(join_key(key, name),
                        f" is missing: expected {(hint or {}).get(name, 'a value')}")


def from_dict(cls, data: Any, *, key: str = "", where: str | None = None,
              exclude: Iterable[str] = (), build: bool = True) -> Any:
  """The dataclass ``cls`` from a JSON object, every key and type checked first.

  Args:
    cls: a dataclass; its fields' annotations are the types checked.
    data: the JSON object (a dict).
    key: the object's own dotted key in the file ("" at the top).
    where: the file name, for the message.
    exclude: fields that may not be given (filled in by the caller).
    build: construct ``cls`` (its ``__post_init__`` checks values); else return the
      checked keyword arguments.

  Returns:
    ``cls(**data)`` checked, or the checked dict when ``build`` is False.

  Raises:
    ConfigError: an unknown key (with the nearest valid one), a missing required key,
      a wrong type, or a value ``cls`` refuses (its message, under the key).
  """
  try:
    if not isinstance(data, dict):
      raise _bad(key, data, cls)
    fields, hints = _fields(cls)
    allowed = [n for n in fields if n not in set(exclude)]
    nested = {n: [f.name for f in dataclasses.fields(hints[n])] for n in allowed
              if dataclasses.is_dataclass(hints[n])}
    check_keys(data, allowed, key=key, what=cls.__name__, elsewhere=nested,
               required=[n for n in allowed if _required(fields[n])],
               hint={n: expected(hints[n]) for n in allowed})
    kwargs = {name: check_value(value, hints[name], join_key(key, name))
              for name, value in data.items()}
    if not build:
      return kwargs
    try:
      return cls(**kwargs)
    except ConfigError as e:
      raise e.within(key) from None
    except (ValueError, TypeError) as e:
      raise ConfigError(key or cls.__name__, f": {e}") from None
  except ConfigError as e:
    if where is None:
      raise
    raise ConfigError(e.key, e.problem, where, rel=e.rel) from None


def check_fields(obj: Any) -> None:
  """Checks every field of a constructed dataclass against its annotation.

  For ``__post_init__``: a config built in Python (or with ``dataclasses.replace``)
  is held to the same rules as one read from a file.

  Raises:
    ConfigError: naming the class, the field, the value and what was expected.
  """
  fields, hints = _fields(type(obj))
  for name in fields:
    try:
      check_value(getattr(obj, name), hints[name], name, build=False)
    except ConfigError as e:
      raise ConfigError(e.key, e.problem, type(obj).__name__, rel=e.rel) from None


def check_count(name: str, value, *, optional: bool = False, low: int = 1) -> None:
  """Raises ValueError unless ``value`` is an integer >= ``low`` (not a bool; None
  allowed when ``optional``): the check of a workflow's count arguments."""
  if optional and value is None:
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{name} = {value!r}: expected {'None or ' if optional else ''}an "
                     f"integer >= {low}")


def at_least(obj: Any, name: str, low: float, *, optional: bool = False) -> None:
  """Raises ``ConfigError`` unless field ``name`` of ``obj`` is >= ``low`` (None
  allowed when ``optional``)."""
  value = getattr(obj, name)
  if optional and value is None:
    return
  if value < low:
    kind = "an integer" if isinstance(value, numbers.Integral) else "a number"
    raise ConfigError(name, f" = {show(value)}: expected {'null or ' if optional else ''}"
                            f"{kind} >= {low}", type(obj).__name__)


def one_of(obj: Any, name: str, choices: Iterable[str]) -> None:
  """Raises ``ConfigError`` unless field ``name`` of ``obj`` is one of ``choices``."""
  choices = list(choices)
  value = getattr(obj, name)
  if value not in choices:
    raise ConfigError(name, f" = {show(value)}: expected one of {', '.join(map(show, choices))}"
                            f"{suggest(value, choices)}", type(obj).__name__)


# ---------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------


def _no_constant(name: str):
  raise ValueError(f"{name} is not a JSON number (non-finite numbers are not allowed)")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
  """Reads a JSON file; every error names the file.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: it is a directory, not UTF-8, not valid JSON (with line and column)
      or holds NaN / Infinity.
  """
  p = pathlib.Path(path)
  try:
    raw = p.read_bytes()
  except FileNotFoundError:
    raise FileNotFoundError(errno.ENOENT, f"{what} not found", str(p)) from None
  except IsADirectoryError:
    raise ValueError(f"{p} is a directory; expected a {what}") from None
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{p}: byte {e.start} ({raw[e.start:e.start + 1]!r}) is not UTF-8 text; "
                     f"expected a JSON {what}") from None
  if not text.strip():
    raise ValueError(f"{p}: the {what} is empty")
  try:
    return json.loads(text, parse_constant=_no_constant)
  except json.JSONDecodeError as e:
    raise ValueError(f"{p}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
                     + (" (is the file truncated?)" if e.pos >= len(text.rstrip()) else "")
                     ) from None
  except ValueError as e:
    raise ValueError(f"{p}: invalid JSON: {e}") from None


def _existing_base(path: pathlib.Path) -> pathlib.Path:
  base = path
  while not base.exists() and base != base.parent:
    base = base.parent
  return base


def check_writable(path: str | os.PathLike, flag: str) -> pathlib.Path:
  """The directory ``path`` exists and can be written, or can be created.

  Checks the directory itself, or the nearest folder above it that exists (where it
  will be created), with ``os.access``; a read-only file system fails it for every
  user, permission bits for everyone but root.

  Raises:
    NotADirectoryError: the path (or a folder above it) is a file.
    PermissionError: it cannot be written.
  """
  p = pathlib.Path(path).absolute()
  base = _existing_base(p)
  if not base.is_dir():
    raise NotADirectoryError(errno.ENOTDIR, f"{flag} needs a directory here, but this is a "
                                            f"file", str(base))
  if not os.access(base, os.W_OK | os.X_OK):
    raise PermissionError(errno.EACCES, f"{flag} cannot write here (read-only or no "
                                        f"permission)", str(base))
  return p


def listing(path: str | os.PathLike) -> list[str]:
  """What a directory holds, without jattr's lock file and temporary files."""
  return sorted(n for n in os.listdir(path) if n != LOCK_FILE and ".tmp-" not in n)


def check_output_file(path: str | os.PathLike, flag: str, *, kind: str,
                      keys: Iterable[str]) -> pathlib.Path:
  """An .npz that a command writes (replacing its own earlier result, nothing else).

  Args:
    path: the file.
    flag: the flag that named it, for the message (``"--out"``).
    kind: what the command writes (``"score"``), for the message.
    keys: arrays every file of that kind holds: an existing file without them is not
      the command's own and is refused.

  Raises:
    ValueError: ``path`` is a directory, or an existing file not of that kind.
    PermissionError, NotADirectoryError: its folder cannot be written.
  """
  p = pathlib.Path(path)
  keys = list(keys)
  if p.is_dir():
    raise ValueError(f"{flag} {p} is a directory; give the path of the .npz file to write "
                     f"(e.g. {p / (kind.replace(' ', '_') + '.npz')})")
  if p.exists():
    try:
      with np.load(p, allow_pickle=False) as z:
        names = set(z.files)
    except Exception:  # not an .npz at all: the message below says what is expected
      names = set()
    if not set(keys) <= names:
      raise ValueError(f"{flag} {p} exists and is not a jattr {kind} file (an .npz with "
                       f"{', '.join(keys)}); choose another path, or move it away first")
  check_writable(p.parent, flag)
  return p


def check_output_dir(path: str | os.PathLike, flag: str, *, kind: str,
                     is_own: Callable[[pathlib.Path], bool]) -> pathlib.Path:
  """A directory that a command writes into: missing, empty, or one of its ``kind``.

  Args:
    path: the directory.
    flag: the flag that named it.
    kind: what it holds (``"feature store"``), for the message.
    is_own: whether an existing, non-empty directory is one of that kind.

  Raises:
    ValueError: ``path`` is a file, or a non-empty directory of something else.
    PermissionError, NotADirectoryError: it cannot be written.
  """
  p = pathlib.Path(path)
  if p.exists() and not p.is_dir():
    raise ValueError(f"{flag} {p} is a file; expected a {kind} directory")
  if p.is_dir():
    held = listing(p)
    if held and not is_own(p):
      shown = ", ".join(held[:5]) + (", …" if len(held) > 5 else "")
      raise ValueError(f"{flag} {p} exists and is not a jattr {kind} (it holds {shown}); "
                       f"choose a new or empty directory so nothing in it is overwritten")
  check_writable(p, flag)
  return p


def is_empty_dir(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a directory holding nothing but jattr's lock and temporary files."""
  p = pathlib.Path(path)
  return p.is_dir() and not listing(p)
