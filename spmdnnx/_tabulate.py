"""`tabulate`: a table of a Module's calls, shapes and parameters, computed abstractly.

The model's method runs under `nnx.eval_shape`, so nothing is computed or
allocated: every sub-Module ``__call__`` made during the call becomes a row
with its path, type, input and output shapes, and the count and bytes of the
Variables it owns directly, one column per Variable type. A ``Total`` row
sums the model (shared Variables counted once).

>>> import jax.numpy as jnp
>>> import spmdnnx as nnx
>>> class MLP(nnx.Module):
...   def __init__(self, rngs):
...     self.fc1 = nnx.Linear(4, 8, rngs=rngs)
...     self.fc2 = nnx.Linear(8, 2, rngs=rngs)
...   def __call__(self, x):
...     return self.fc2(nnx.relu(self.fc1(x)))
>>> print(tabulate(MLP(nnx.Rngs(0)), jnp.ones((3, 4))))
path   module  inputs        outputs       Param
-----  ------  ------------  ------------  ----------
       MLP     float32[3,4]  float32[3,2]
fc1    Linear  float32[3,4]  float32[3,8]  40 (160 B)
fc2    Linear  float32[3,8]  float32[3,2]  18 (72 B)
-----  ------  ------------  ------------  ----------
Total                                      58 (232 B)
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import jax
import numpy as np

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._module import Module
from spmdnnx._transforms import eval_shape
from spmdnnx._variables import Variable


class _Recorder(threading.local):

  def __init__(self):
    self.rows: list | None = None
    self.paths: dict = {}


_REC = _Recorder()


def _describe(tree: Any) -> str:
  """``float32[3,4]`` for arrays, joined for pytrees of them."""
  parts = []
  for leaf in jax.tree.leaves(tree):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      parts.append(f"{np.dtype(leaf.dtype).name}[{','.join(str(d) for d in leaf.shape)}]")
    else:
      parts.append(repr(leaf))
  return ", ".join(parts)


def _make_hook(original):

  def hooked(self, *args, **kwargs):
    rows = _REC.rows
    if rows is None or id(self) not in _REC.paths:
      return original(self, *args, **kwargs)
    row = [_REC.paths[id(self)], type(self).__name__, _describe((args, kwargs)), ""]
    rows.append(row)
    out = original(self, *args, **kwargs)
    row[3] = _describe(out)
    return out

  hooked.__wrapped__ = original
  return hooked


@contextlib.contextmanager
def _hooks(classes: set[type]) -> Iterator[None]:
  """Records ``__call__`` of these Module classes while active."""
  patched = []
  for cls in classes:
    if "__call__" in vars(cls):
      original = vars(cls)["__call__"]
      cls.__call__ = _make_hook(original)
      patched.append((cls, original))
  try:
    yield
  finally:
    for cls, original in patched:
      cls.__call__ = original


def _variable_table(model: Any) -> tuple[dict, dict, list]:
  """Per-module-path {type: (count, bytes)}, totals, and the column order."""
  per: dict = {}
  total: dict = {}
  order: list = []
  seen: set = set()
  module_paths = {path for path, node in graph.iter_graph(model) if isinstance(node, Module)}
  for path, node in graph.iter_graph(model):
    if not isinstance(node, Variable) or id(node) in seen:
      continue
    seen.add(id(node))
    owner = path[:-1]
    while owner and owner not in module_paths:
      owner = owner[:-1]
    name = type(node).__name__
    if name not in order:
      order.append(name)
    value = node.value
    size = int(np.prod(np.shape(value))) if hasattr(value, "shape") else 1
    nbytes = size * np.dtype(getattr(value, "dtype", np.float32)).itemsize
    for table in (per.setdefault(owner, {}), total):
      c, b = table.get(name, (0, 0))
      table[name] = (c + size, b + nbytes)
  return per, total, order


def _fmt_bytes(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1024 or unit == "TB":
      return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n} B"


def _cell(entry: tuple | None) -> str:
  return "" if entry is None else f"{entry[0]:,} ({_fmt_bytes(entry[1])})"


def _render(header: list, rows: list, footer: list) -> str:
  widths = [max(len(str(r[i])) for r in [header, *rows, footer]) for i in range(len(header))]
  rule = [("-" * w) for w in widths]

  def line(r):
    return "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()

  return "\n".join([line(header), line(rule), *(line(r) for r in rows), line(rule),
                    line(footer)])


def tabulate(obj: Any, *args: Any, depth: int | None = None, method: str = "__call__",
             **kwargs: Any) -> str:
  """A text table of the calls ``obj.<method>(*args, **kwargs)`` makes.

  Args:
    obj: a Module.
    *args, **kwargs: the call's inputs (arrays or ``jax.ShapeDtypeStruct``).
    depth: show only modules at most this many attributes below ``obj``.
    method: the method of ``obj`` to run (default ``__call__``).

  Returns:
    the table as a string (one row per module call, in call order).

  Raises:
    ArgumentError: when ``obj`` is not a Module or has no such method.
  """
  if not isinstance(obj, Module):
    raise errors.ArgumentError(
        f"tabulate: expected a Module, got {type(obj).__name__}.", argument="obj")
  if not callable(getattr(obj, method, None)):
    raise errors.ArgumentError(
        f"tabulate: {type(obj).__name__} has no method {method!r}; pass method=<name>.",
        argument="method", value=method)
  classes = {type(node) for _, node in graph.iter_graph(obj) if isinstance(node, Module)}
  rows: list = []

  def run(model, *a, **k):
    _REC.paths = {id(m): path for path, m in graph.iter_graph(model) if isinstance(m, Module)}
    if method == "__call__":
      return model(*a, **k)
    root_path = ()
    row = [root_path, type(model).__name__, _describe((a, k)), ""]
    rows.append(row)
    out = getattr(model, method)(*a, **k)
    row[3] = _describe(out)
    return out

  _REC.rows = rows
  try:
    with _hooks(classes):
      eval_shape(lambda model, *a: run(model, *a, **kwargs), obj, *args)
  finally:
    _REC.rows = None
    _REC.paths = {}
  per, total, order = _variable_table(obj)
  header = ["path", "module", "inputs", "outputs", *order]
  body = []
  for path, kind, ins, outs in rows:
    if depth is not None and len(path) > depth:
      continue
    body.append(["/".join(str(p) for p in path), kind, ins, outs,
                 *(_cell(per.get(tuple(path), {}).get(n)) for n in order)])
  footer = ["Total", "", "", "", *(_cell(total.get(n)) for n in order)]
  return _render(header, body, footer)
