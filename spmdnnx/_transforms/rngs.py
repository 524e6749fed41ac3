"""`split_rngs`: give every vmapped/scanned slice its own random keys.

Used as a decorator above `vmap`/`scan` or as a context manager. Before the
call, each selected Rngs stream's key is replaced by ``splits`` keys drawn
from it (and its counter by ``splits`` zeros); afterwards the stream gets its
own key back, advanced by one draw, so later calls differ.

>>> import spmdnnx as nnx
>>> rngs = nnx.Rngs(0)
>>> with split_rngs(rngs, splits=4):
...   rngs.default.key.value.shape
(4,)
>>> rngs.default.key.value.shape
()
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graph
from spmdnnx._rngs import RngStream


def _streams(tree: Any, only: Any) -> list[RngStream]:
  pred = filterlib.to_predicate(only)
  out, seen = [], set()
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=graph.is_graph_node):
    if not graph.is_graph_node(leaf):
      continue
    for path, node in graph.iter_graph(leaf):
      if isinstance(node, RngStream) and id(node) not in seen and pred(path, node):
        seen.add(id(node))
        out.append(node)
  return out


@contextlib.contextmanager
def _split(tree: Any, splits: int | tuple, only: Any, squeeze: bool) -> Iterator[None]:
  saved = []
  for stream in _streams(tree, only):
    key, count = stream.key.value, stream.count.value
    new_key = jax.random.split(stream(), splits)
    if squeeze:
      new_key = new_key[0]
    saved.append((stream, key, stream.count.value))
    stream.key.value = new_key
    stream.count.value = jnp.zeros(jnp.shape(new_key), dtype=count.dtype)
  try:
    yield
  finally:
    for stream, key, count in saved:
      stream.key.value = key
      stream.count.value = count


def split_rngs(node_or_fn: Any = None, /, *, splits: int | tuple, only: Any = ...,
               squeeze: bool = False) -> Any:
  """Splits Rngs keys for a vectorised call (decorator or context manager).

  Args:
    node_or_fn: a graph (Rngs, Module...) to use as a context manager, or
      None to get a decorator.
    splits: how many keys each stream gets (an int or a shape).
    only: filter selecting which streams to split (default: all).
    squeeze: with ``splits=1``, give each stream one fresh key of the
      original shape instead of a batch of one (as Flax does), e.g. for a
      body that runs once but must not reuse the caller's keys.

  Raises:
    TransformError: ``splits`` not positive, or ``squeeze`` with ``splits != 1``.
  """
  if isinstance(splits, int) and not isinstance(splits, bool) and splits <= 0:
    raise errors.TransformError(f"split_rngs: splits must be positive, got {splits}.")
  if squeeze and splits != 1:
    raise errors.TransformError(
        f"split_rngs: squeeze=True needs splits=1 (one key per stream, squeezed), got "
        f"splits={splits!r}; drop squeeze to get {splits!r} keys per stream.")
  if node_or_fn is not None and not callable(node_or_fn) or graph.is_graph_node(node_or_fn):
    return _split(node_or_fn, splits, only, squeeze)

  def decorator(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
      with _split((args, kwargs), splits, only, squeeze):
        return f(*args, **kwargs)
    return wrapper

  return decorator(node_or_fn) if callable(node_or_fn) else decorator
