"""Checks every lifted transform makes when it is created.

- `check_unbound`: a bound method of a Module (``nnx.jit(m.apply)``) is
  refused: the transform would capture ``m`` as a constant and its updates
  would be lost. Decorate the method, or pass the unbound method and the
  instance as the first argument.
- `check_prefix`: an ``in_shardings`` / ``out_shardings`` / axes prefix may not
  hold Variables, may hold graph objects only in tree mode, and may hold
  `StateSharding`-style filter maps only in graph mode with updates.
- `resolve_modes`: ``graph`` / ``graph_updates`` with None read from the
  settings in force (`spmdnnx.set_graph_mode`, `spmdnnx.set_graph_updates`).

>>> import spmdnnx as nnx
>>> class M(nnx.Module):
...   def f(self, x):
...     return x
>>> try:
...   nnx.jit(M().f)
... except nnx.errors.TransformError as e:
...   print(str(e).split(" (")[0])
nnx.jit does not support bound methods
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx import _modes as modes
from spmdnnx._object import Dict, List
from spmdnnx._transforms import lift
from spmdnnx._variables import Variable


def resolve_modes(graph_mode: bool | None, graph_updates: bool | None) -> tuple[bool, bool]:
  """``(graph, graph_updates)`` with None replaced by the settings in force."""
  return modes.resolve_graph(graph_mode), modes.resolve_graph_updates(graph_updates)


def is_bound_module_method(f: Any) -> bool:
  """Whether `f` (through functools.partial layers) is a method bound to a graph object."""
  while isinstance(f, functools.partial):
    f = f.func
  return inspect.ismethod(f) and graph.is_graph_node(getattr(f, "__self__", None))


def check_unbound(f: Any, who: str) -> None:
  """Raises TransformError (a ValueError) if `f` is a method bound to a Module.

  Raises:
    TransformError: `f` is bound; the message shows both accepted forms.
  """
  if is_bound_module_method(f):
    inner = f
    while isinstance(inner, functools.partial):
      inner = inner.func
    owner = type(inner.__self__).__name__
    name = inner.__func__.__name__
    raise errors.TransformError(
        f"nnx.{who} does not support bound methods ({owner}.{name} bound to an "
        f"instance): the instance would be captured as a constant and its updates "
        f"lost. Decorate the method with @nnx.{who}, or call "
        f"nnx.{who}({owner}.{name})(instance, ...) with the unbound method.")


class PrefixMap:
  """Base of filter-to-value maps used as transform prefixes (StateSharding, StateAxes)."""


def check_prefix(prefix: Any, name: str, who: str, graph_mode: bool,
                 graph_updates: bool) -> None:
  """Validates an in/out sharding or axes prefix for the transform's mode.

  Raises:
    TransformError: the prefix holds a Variable; a graph object in graph
      mode; a filter map (`StateSharding`) without graph mode and updates.
  """

  def visit(path, leaf):
    where = jax.tree_util.keystr(path) or "(top level)"
    if isinstance(leaf, Variable):
      raise errors.TransformError(
          f"Found a {type(leaf).__name__} at {where} in `{name}` for nnx.{who}: "
          "Variables cannot be prefixes. Give one prefix value for the whole "
          "Variable (or use nnx.prefix to build the prefix of a Module).",
          paths=[where])
    if isinstance(leaf, PrefixMap) and not (graph_mode and graph_updates):
      raise errors.TransformError(
          f"`{name}` cannot contain `{type(leaf).__name__}` objects when graph=False "
          f"or graph_updates=False (found at {where} for nnx.{who}). Use "
          f"nnx.prefix(node, {{filter: value}}) instead, or graph mode with updates: "
          f"nnx.{who}(..., graph=True, graph_updates=True).", paths=[where])
    if graph_mode and (graph.is_graph_node(leaf) or isinstance(leaf, (List, Dict))):
      raise errors.TransformError(
          f"Found a graph node of type {type(leaf).__name__} at {where} in `{name}` "
          f"for nnx.{who}. Graph nodes are not allowed as prefixes when graph=True; "
          f"build the prefix with nnx.prefix(node, {{filter: value}}), or use tree "
          f"mode: nnx.{who}(..., graph=False).", paths=[where])

  leaves = jax.tree_util.tree_flatten_with_path(
      prefix, is_leaf=lambda x: x is None or isinstance(x, (Variable, PrefixMap))
      or graph.is_graph_node(x) or (graph_mode and _holds_graph_data(x)))[0]
  for path, leaf in leaves:
    visit(path, leaf)


def _holds_graph_data(x: Any) -> bool:
  """An nnx.List / nnx.Dict holding Variables or graph objects (a graph node in Flax)."""
  return isinstance(x, (List, Dict)) and any(
      graph.is_graph_node(v) for v in jax.tree_util.tree_leaves(x, is_leaf=graph.is_graph_node))


def check_kept_structure(restructure: Any, who: str, name: str) -> None:
  """graph_updates=False / tree mode: a structure change inside is an error.

  Raises:
    TransformError: `restructure` (from `lift.collect`) is not None.
  """
  if restructure is not None:
    raise errors.TransformError(
        f"{who}({name}) with graph=False or graph_updates=False changed the structure of "
        f"its graph arguments (state paths now "
        f"{errors.format_paths(map(errors.path_str, restructure.paths))}). Only Variable "
        f"values flow back in this mode: update values with `v[...] = x`, or use "
        f"nnx.{who}(..., graph=True, graph_updates=True).",
        paths=list(restructure.paths))


def check_no_returned_inputs(out: Any, who: str, name: str) -> None:
  """Tree mode / no updates: an input object returned (an `InputRef` marker) is an error.

  Raises:
    TransformError: `out` (marked by `lift.collect`) holds an input object.
  """
  refs = [m for m in jax.tree_util.tree_leaves(
      out, is_leaf=lambda x: isinstance(x, (lift.InputRef, lift.NodeOut)))
      if isinstance(m, lift.InputRef)]
  if refs:
    where = errors.path_str(refs[0].path) if refs[0].path else "(the object itself)"
    raise errors.TransformError(
        f"{who}({name}) with graph=False or graph_updates=False returned input argument "
        f"node #{refs[0].index} at {where}: this mode does not support Variable aliasing "
        f"(an input returned as an output). Return its values or a copy (nnx.clone), or "
        f"use nnx.{who}(..., graph=True, graph_updates=True).", paths=[refs[0].path])
