"""Rngs over a graph: `split_rngs`, `fork_rngs`, `with_rngs`, `restore_rngs`.

`split_rngs` gives every vmapped/scanned slice its own random keys: each
selected Rngs stream's key is replaced by ``splits`` keys split from the
stream's next key (and its counter by ``splits`` zeros). In graph mode with
graph updates (the default) this happens in place and returns a
`SplitBackups`, which puts the original keys back on `restore_rngs` or when
used as a context manager; otherwise (``graph=False`` or
``graph_updates=False``) the node is left alone and a copy with split streams
is returned. Either way the original streams advance by one draw, so later
calls differ.

>>> import spmdnnx as nnx
>>> rngs = nnx.Rngs(0)
>>> with split_rngs(rngs, splits=4):
...   rngs.default.key.value.shape
(4,)
>>> rngs.default.key.value.shape
()
>>> split_rngs(rngs, splits=3, graph_updates=False).default.key.value.shape
(3,)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graph
from spmdnnx import _modes as modes
from spmdnnx._rngs import RngStream
from spmdnnx._variables import MISSING, RngCount, RngKey


class SplitBackups:
  """The streams a graph-mode `split_rngs` / `fork_rngs` changed, with their old state.

  Iterate it for ``(stream, key, count)`` triples; `restore_rngs` (or leaving
  a ``with`` block over it) writes the saved keys and counters back.
  """

  def __init__(self, backups: list):
    self.backups = backups

  def __iter__(self) -> Iterator[tuple]:
    return iter(self.backups)

  def __len__(self) -> int:
    return len(self.backups)

  def __enter__(self) -> "SplitBackups":
    return self

  def __exit__(self, *exc) -> bool:
    restore_rngs(self)
    return False


def restore_rngs(backups: Any, /) -> None:
  """Writes back the keys (and counters) saved by `split_rngs` / `fork_rngs`.

  >>> import spmdnnx as nnx
  >>> rngs = nnx.Rngs(0)
  >>> saved = split_rngs(rngs, splits=2)
  >>> restore_rngs(saved); rngs.default.key.value.shape
  ()
  """
  for backup in backups:
    stream = backup[0]
    stream.key.value = backup[1]
    if len(backup) > 2:
      stream.count.value = backup[2]


def _selected(stream: RngStream, path: tuple, pred: Callable) -> bool:
  """Flax's rule: a stream is selected when its key and count Variables both match."""
  return pred((*path, "key"), stream.key) and pred((*path, "count"), stream.count)


def _streams(tree: Any) -> list[tuple[tuple, RngStream]]:
  """``(path, stream)`` for every RngStream in a pytree of graphs, each once."""
  out, seen = [], set()
  for path, node in graph.iter_graph(tree):
    if isinstance(node, RngStream) and id(node) not in seen:
      seen.add(id(node))
      out.append((path, node))
  return out


def _set_stream(target: RngStream, key: jax.Array, count_shape: tuple) -> None:
  target.key = RngKey(key, tag=target.tag)
  target.count = RngCount(jnp.zeros(count_shape, dtype=jnp.uint32), tag=target.tag)


def _on_copy(node: Any, make: Callable[[tuple, RngStream], tuple | None]) -> Any:
  """A copy of `node` whose streams are rebuilt by ``make(path, original)``.

  ``make`` returns ``(key, count_shape)`` for a stream to replace (drawing from
  the original, which advances) or None to copy the stream unchanged.
  """
  plans = {}
  for path, stream in _streams(node):
    plan = make(path, stream)
    if plan is not None:
      plans[path] = plan
  new = graph.clone(node)
  for path, stream in _streams(new):
    if path in plans:
      _set_stream(stream, *plans[path])
  return new


def _split_key(stream: RngStream, splits: Any, squeeze: bool) -> tuple:
  key = jax.random.split(stream(), splits)
  count_shape = jnp.shape(stream.count.value)
  if squeeze:
    return key[0], count_shape
  lead = (splits,) if isinstance(splits, int) else tuple(splits)
  return key, lead + count_shape


def _check_splits(splits: Any, squeeze: bool) -> None:
  if isinstance(splits, int) and not isinstance(splits, bool) and splits <= 0:
    raise errors.TransformError(f"split_rngs: splits must be positive, got {splits}.")
  if squeeze and splits != 1:
    raise errors.TransformError(
        f"split_rngs: squeeze=True needs splits=1 (one key per stream, squeezed), got "
        f"splits={splits!r}; drop squeeze to get {splits!r} keys per stream.")


def _as_decorator(node: Any) -> bool:
  return node is MISSING or node is None or (callable(node) and not graph.is_graph_node(node))


def _decorator(node: Any, in_place: bool, graph_mode: Any, apply: Callable) -> Callable:
  """`split_rngs`/`fork_rngs` as a decorator: ``apply(tree, graph, graph_updates)``
  rekeys a call's arguments (in place for the call, or on a copy)."""
  def decorator(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
      if in_place:
        with apply((args, kwargs), True, True):
          return f(*args, **kwargs)
      args, kwargs = apply((args, kwargs), graph_mode, False)
      return f(*args, **kwargs)
    return wrapper
  return decorator(node) if callable(node) and node is not MISSING else decorator


def _rekey(node: Any, plan: Callable[[tuple, RngStream], tuple | None],
           in_place: bool) -> Any:
  """Gives the streams ``plan(path, stream)``'s ``(key, count_shape)``.

  In place: returns a `SplitBackups` restoring the old keys; else the copy.
  """
  if not in_place:
    return _on_copy(node, plan)
  backups = []
  for path, stream in _streams(node):
    new = plan(path, stream)
    if new is not None:
      backups.append((stream, stream.key.value, stream.count.value))
      stream.key.value = new[0]
      stream.count.value = jnp.zeros(new[1], dtype=jnp.uint32)
  return SplitBackups(backups)


def split_rngs(node: Any = MISSING, /, *, splits: int | tuple, only: Any = ...,
               squeeze: bool = False, graph: bool | None = None,
               graph_updates: bool | None = None) -> Any:
  """Splits Rngs keys for a vectorised call (in place, on a copy, or as a decorator).

  Args:
    node: a graph (Rngs, Module, pytree of them); omitted (or a function),
      returns a decorator that splits the streams of the function's arguments
      for each call (restoring them afterwards in graph-updates mode).
    splits: how many keys each stream gets (an int or a shape).
    only: filter selecting which streams to split (default: all); it is
      tested on each stream's ``key`` and ``count`` Variables, so a stream
      name (``"dropout"``) or ``PathContains`` works.
    squeeze: with ``splits=1``, give each stream one fresh key of the
      original shape instead of a batch of one (as Flax does).
    graph: graph mode (default: `set_graph_mode`'s value).
    graph_updates: with graph mode, change the streams in place (default:
      `set_graph_updates`'s value); False returns a changed copy instead.

  Returns:
    In place: a `SplitBackups` (a context manager restoring the keys on
    exit). Otherwise: the copy of ``node``. Without ``node``: a decorator.

  Raises:
    TransformError: ``splits`` not positive, or ``squeeze`` with ``splits != 1``.
  """
  _check_splits(splits, squeeze)
  in_place = modes.resolve_graph(graph) and modes.resolve_graph_updates(graph_updates)
  if _as_decorator(node):
    return _decorator(node, in_place, graph, lambda tree, g, gu: split_rngs(
        tree, splits=splits, only=only, squeeze=squeeze, graph=g, graph_updates=gu))
  pred = filterlib.to_predicate(only)
  return _rekey(node, lambda path, s: _split_key(s, splits, squeeze)
                if _selected(s, path, pred) else None, in_place)


def _rules(how: Any) -> list:
  """``[(filter, predicate, size)]`` from None / an int or shape / a mapping."""
  if how is None:
    return []
  if isinstance(how, (int, tuple)):
    how = {...: how}
  return [(f, filterlib.to_predicate(f), n) for f, n in how.items()]


def fork_rngs(node: Any = MISSING, /, *, split: Any = None, graph: bool | None = None,
              graph_updates: bool | None = None) -> Any:
  """Reseeds each stream with its own next key (optionally split), for a call.

  Like `split_rngs` (in place with a `SplitBackups`, on a copy, or as a
  decorator), but every stream is forked: its key becomes the stream's next
  key (``split``: an int, a shape, or ``{filter: n or None}``, batches the
  matching streams' keys) and its counter restarts at 0.

  >>> import spmdnnx as nnx
  >>> rngs = nnx.Rngs(params=0, dropout=1)
  >>> forked = fork_rngs(rngs, split={"dropout": 4}, graph_updates=False)
  >>> forked.params.key.value.shape, forked.dropout.key.value.shape
  ((), (4,))
  """
  in_place = modes.resolve_graph(graph) and modes.resolve_graph_updates(graph_updates)
  if _as_decorator(node):
    return _decorator(node, in_place, graph, lambda tree, g, gu: fork_rngs(
        tree, split=split, graph=g, graph_updates=gu))
  rules = _rules({...: None} if split is None else split)

  def plan(path, stream):
    for _, pred, n in rules:
      if _selected(stream, path, pred):
        forked = stream.fork(split=n)
        return forked.key.value, jnp.shape(forked.count.value)
    return None

  return _rekey(node, plan, in_place)


def with_rngs(node: Any = MISSING, /, *, split: Any = None, fork: Any = None,
              broadcast: Any = None, only: Any = True, graph: bool | None = None,
              graph_updates: bool | None = None) -> Any:
  """A copy of ``node`` whose Rngs streams are split, broadcast or forked.

  The original streams are not replaced, but each one used advances by one
  draw. Without ``node``, returns a decorator applying this to a function's
  arguments on each call.

  Args:
    node: a graph or pytree holding Rngs / RngStreams.
    split: an int or shape (all streams), or ``{filter: shape}`` (first
      matching filter wins): those streams hold that many keys split from
      their next key.
    fork: a filter (or list of filters): those streams are reseeded with
      their next key.
    broadcast: like ``split``, but the next key is repeated, not split.
    only: only streams matching this filter are touched.
    graph: accepted for Flax compatibility (the copy keeps shared
      references in graph mode; tree mode copies the same way).
    graph_updates: accepted for Flax compatibility (always a copy).

  Raises:
    TransformError: (a ValueError) a stream matches rules of two kinds
      through specific (not ``...``) filters.

  >>> import spmdnnx as nnx
  >>> rngs = nnx.Rngs(params=0, dropout=1)
  >>> new = with_rngs(rngs, split={"params": 4}, fork=...)
  >>> new.params.key.value.shape, new.dropout.key.value.shape
  ((4,), ())
  """
  del graph_updates
  if node is MISSING:
    def decorator(f: Callable) -> Callable:
      @functools.wraps(f)
      def wrapper(*args, **kwargs):
        args, kwargs = with_rngs((args, kwargs), split=split, fork=fork,
                                 broadcast=broadcast, only=only, graph=graph)
        return f(*args, **kwargs)
      return wrapper
    return decorator
  split_rules, broadcast_rules = _rules(split), _rules(broadcast)
  if fork is None:
    forks = []
  elif isinstance(fork, (list, tuple)) and not isinstance(fork, str):
    forks = list(fork)
  else:
    forks = [fork]
  fork_rules = [(f, filterlib.to_predicate(f), None) for f in forks]
  only_pred = filterlib.to_predicate(only)

  def plan(path, stream):
    if not only_pred(path, stream):
      return None
    hits = {}
    for kind, rules in (("split", split_rules), ("broadcast", broadcast_rules),
                        ("fork", fork_rules)):
      for filt, pred, n in rules:
        if pred(path, stream):
          hits[kind] = (filt, n)
          break
    specific = [k for k, (filt, _) in hits.items() if filt is not ... and filt is not True]
    if len(specific) > 1:
      raise errors.TransformError(
          f"with_rngs: the RngStream at {errors.path_str(path)} matches multiple "
          "rules: " + "; ".join(f"{k} by filter {hits[k][0]!r}" for k in specific)
          + ". Make the filters disjoint (e.g. split={'params': 4}, "
          "fork=nnx.Not('params')).", paths=[path])
    if "split" in hits:
      return _split_key(stream, hits["split"][1], False)
    if "broadcast" in hits:
      new = stream.broadcast(hits["broadcast"][1])
      return new.key.value, jnp.shape(new.count.value)
    if "fork" in hits:
      new = stream.fork()
      return new.key.value, jnp.shape(new.count.value)
    return None

  return _on_copy(node, plan)
