"""The evaluator registry: a name in `config.eval` -> one evaluator, built once, its inputs checked first.

Config
------
`eval.evaluator` names the evaluator (`""`: none; the image jobs then write
sample grids only). Its keyword arguments are the sub-dict named after it,
`eval.<name>`, e.g.

  c.eval.evaluator = "inception_fid"
  c.eval.inception_fid = ml_collections.ConfigDict(
    {"weights": "inception_fid.npz", "reference_stats": "cifar10_stats.npz"}
  )

so one config may hold the settings of several evaluators, and switching
`eval.evaluator` on the command line never hands one evaluator's arguments to
another. The other fields of `eval` (`batch_size`, `grid_size`, ...) belong to
the jobs and are not read here. `""` (or None) for a file argument means unset.

`build(config.eval, **context)` checks everything it can before any compute
(a known name, no unknown argument, required ones set, every file argument an
existing readable file), then builds the evaluator, which reads and checks its
files (shapes, values) at once: every problem is an
`emd_jax.config.validation.ConfigError` whose message starts with the field,
e.g. `eval.inception_fid.weights: w.npz: Inception weights file does not
exist`. `check_config(config.eval)` runs the first half only (no file is
parsed), for config validation. Context is what a job supplies, not the
config: a factory declares the names it takes (`context=("teacher",)`), `build`
passes those and ignores the rest, so every job may call
`build(config.eval, teacher=teacher)`.

Call forms (`kind`)
-------------------
- `"samples"`: `evaluator(samples, labels=None) -> dict`: generated samples (images
  `[N, H, W, C]` in `[-1, 1]`, or vectors `[N, D]`), conditioning labels `[N]` ints (or
  None); a dict of float scalars (plus arrays such as `class_hist`).
- `"restoration"`: `evaluator(restored, clean, observed=None) -> dict`: restored and
  clean images `[N, H, W, C]`, and optionally the observation brought to image space
  (e.g. the back-projection `A^T y`); per-set means of float scalars.

Registered
----------
| name | kind | `eval.<name>` arguments | context | module |
|---|---|---|---|---|
| `digits` | samples | layout, reference_split, k | - | `digits` |
| `inception_fid` | samples | weights, reference_stats (files), batch_size, resize_to | - | `inception` |
| `gmm` | samples | seed, num_projections | teacher (a GMM) | `gmm` |
| `restoration` | restoration | data_range | - | `restoration` |

Adding an evaluator
-------------------
Decorate its class (or any factory function) with `register`; the factory's
keyword parameters are the config arguments, except those named in `context`:

  from emd_jax.evaluators import registry

  @registry.register("my_fid", files=("weights",), context=("teacher",))
  class MyFID:
    name, kind = "my_fid", "samples"

    def __init__(self, teacher, weights: str, batch_size: int = 64):
      ...  # read and check `weights` here (raise errors.UserInputError naming the file)

    def __call__(self, samples, labels=None) -> dict: ...

The built-in modules are imported on first use of the registry; import your
own module before `build` (or add it to `_BUILTIN_MODULES`). A factory's
`ValueError` (hence `UserInputError`) becomes a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any

KINDS = ("samples", "restoration")
_BUILTIN_MODULES = (
  "emd_jax.evaluators.digits",
  "emd_jax.evaluators.inception",
  "emd_jax.evaluators.gmm",
  "emd_jax.evaluators.restoration",
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered evaluator: its factory and what `build` checks before calling it."""

  name: str
  factory: Callable[..., Any]
  kind: str
  files: tuple[str, ...]  # arguments that are paths of input files
  context: tuple[str, ...]  # arguments the job supplies (not from the config)

  def parameters(self) -> dict[str, inspect.Parameter]:
    """The config arguments: the factory's keyword parameters minus the context."""
    params = inspect.signature(self.factory).parameters
    return {
      k: p for k, p in params.items() if k not in self.context and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


_REGISTRY: dict[str, Entry] = {}
_loaded = False


def register(
  name: str, *, kind: str = "samples", files: tuple[str, ...] = (), context: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """Decorator: registers `factory` (a class or a function) as evaluator `name`; returns it unchanged."""
  if not name.isidentifier():
    raise ValueError(f"evaluator name {name!r} must be an identifier (it names the sub-dict eval.{name})")
  if kind not in KINDS:
    raise ValueError(f"evaluator kind {kind!r} is not one of {KINDS}")

  def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
    if name in _REGISTRY and _REGISTRY[name].factory is not factory:
      raise ValueError(f"evaluator {name!r} is already registered ({_REGISTRY[name].factory!r})")
    entry = Entry(name, factory, kind, tuple(files), tuple(context))
    params = inspect.signature(factory).parameters
    unknown = [k for k in (*entry.files, *entry.context) if k not in params]
    if unknown:
      raise ValueError(f"evaluator {name!r}: {unknown} are not parameters of {factory!r}")
    _REGISTRY[name] = entry
    return factory

  return wrap


def _load_builtins() -> None:
  global _loaded
  if not _loaded:
    _loaded = True
    for module in _BUILTIN_MODULES:
      importlib.import_module(module)


def names() -> list[str]:
  """The registered evaluator names, sorted."""
  _load_builtins()
  return sorted(_REGISTRY)


def entry(name: str) -> Entry:
  """The registry entry of `name`; a `ConfigError` on `eval.evaluator` listing the registered names if unknown."""
  _load_builtins()
  if name not in _REGISTRY:
    raise _config_error("eval.evaluator", f"unknown evaluator {name!r}; registered: {', '.join(names())}")
  return _REGISTRY[name]


def _config_error(field: str, message: str) -> Exception:
  from emd_jax.config.validation import ConfigError  # lazily: config validation imports this module

  return ConfigError(field, message)


def _unset(value: Any) -> bool:
  return value is None or (isinstance(value, str) and not value)


def _arguments(eval_cfg: Any, e: Entry, prefix: str) -> dict[str, Any]:
  """The checked keyword arguments of `e` from `eval_cfg[e.name]`: known names, required ones set, files readable."""
  where = f"{prefix}.{e.name}"
  raw = eval_cfg.get(e.name, None) if eval_cfg is not None else None
  if raw is None:
    raw = {}
  if not isinstance(raw, Mapping) and not hasattr(raw, "items"):
    raise _config_error(where, f"must be a dict of keyword arguments of {e.name!r}, got {type(raw).__name__}")
  params = e.parameters()
  kwargs = {}
  for k, v in dict(raw.items()).items():
    if k not in params:
      accepted = ", ".join(params) or "none"
      raise _config_error(f"{where}.{k}", f"not an argument of evaluator {e.name!r} (accepted: {accepted})")
    if not (k in e.files and _unset(v)):
      kwargs[k] = v
  for k, p in params.items():
    if p.default is inspect.Parameter.empty and k not in kwargs:
      what = "a file path" if k in e.files else "a value"
      raise _config_error(f"{where}.{k}", f"required by evaluator {e.name!r}: set it to {what}")
  for k in e.files:
    if k in kwargs:
      _check_readable(f"{where}.{k}", kwargs[k])
  return kwargs


def _check_readable(field: str, path: Any) -> None:
  if not isinstance(path, str | os.PathLike):
    raise _config_error(field, f"must be a file path, got {type(path).__name__} {path!r:.60}")
  from emd_jax.formats import paths

  if not paths.exists(path):
    raise _config_error(field, f"{path}: does not exist")
  if not paths.isfile(path):
    raise _config_error(field, f"{path}: is not a regular file")
  try:
    with paths.open(path, "rb") as f:
      f.read(1)
  except OSError as e:
    raise _config_error(field, f"{path}: cannot be read ({type(e).__name__}: {e.strerror or e})") from e


def check_config(eval_cfg: Any, prefix: str = "eval") -> None:
  """Checks `config.eval` without building or reading anything beyond one byte per file.

  A known `evaluator` name (or `""`), only known arguments in `eval.<name>`, the
  required ones set, each file argument an existing readable file. Raises
  `ConfigError` naming the field. `prefix`: how the field names start.
  """
  name = eval_cfg.get("evaluator", "") if eval_cfg is not None else ""
  if not name:
    return
  _arguments(eval_cfg, entry(name), prefix)


def build(eval_cfg: Any, prefix: str = "eval", **context: Any) -> Any:
  """The evaluator `config.eval` names, built once; None for `evaluator = ""`.

  `context`: what the job supplies (e.g. `teacher=`); each factory gets the names it
  declares. Every input is checked before this returns (see the module docstring);
  errors are `ConfigError`s naming the field.
  """
  name = eval_cfg.get("evaluator", "") if eval_cfg is not None else ""
  if not name:
    return None
  e = entry(name)
  kwargs = _arguments(eval_cfg, e, prefix)
  missing = [k for k in e.context if k not in context]
  if missing:
    raise TypeError(f"evaluator {name!r} needs {missing} from the job: build(config.eval, {missing[0]}=...)")
  kwargs.update({k: context[k] for k in e.context})
  try:
    return e.factory(**kwargs)
  except ValueError as err:  # includes UserInputError (a file's content); ConfigError passes as it is
    from emd_jax.config.validation import ConfigError
    from emd_jax.errors import one_line

    if isinstance(err, ConfigError):
      raise
    message = one_line(err)
    field = next((k for k in e.files if k in kwargs and str(kwargs[k]) in message), None)
    raise _config_error(f"{prefix}.{name}" + (f".{field}" if field else ""), message) from err


def kind(name: str) -> str:
  """The call form of evaluator `name`: "samples" or "restoration"."""
  return entry(name).kind
