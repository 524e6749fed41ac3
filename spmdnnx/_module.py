"""Module: the base class of models, a plain Python object in the graph.

>>> import jax.numpy as jnp
>>> from spmdnnx._variables import Param
>>> class Scale(Module):
...   def __init__(self, n):
...     self.w = Param(jnp.ones(n), logical_axes=("embed",))
...   def __call__(self, x):
...     return x * self.w
>>> Scale(3)(jnp.arange(3.0))
Array([0., 1., 2.], dtype=float32)
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graph
from spmdnnx._object import Object
from spmdnnx._graph import iter_graph as _iter_graph
from spmdnnx._rngs import RngStream
from spmdnnx._typing import PathParts
from spmdnnx._variables import Intermediate, Perturbation, Variable


def _append(xs: tuple, x: Any) -> tuple:
  return (*xs, x)


def _empty() -> tuple:
  return ()


class Module(Object):
  """Base class for layers and models (reference semantics, any attributes)."""

  def sow(self, variable_type: type[Variable] | str, name: str, value: Any,
          reduce_fn: Callable = _append, init_fn: Callable = _empty) -> None:
    """Records `value` in a Variable attribute `name` (a tuple by default).

    Read the values back with ``nnx.pop(model, nnx.Intermediate)`` or
    ``nnx.state(model, nnx.Intermediate)``.
    """
    if isinstance(variable_type, str):
      variable_type = Intermediate
    current = self.__dict__.get(name)
    if current is None:
      setattr(self, name, variable_type(reduce_fn(init_fn(), value)))
    elif isinstance(current, variable_type):
      current.value = reduce_fn(current.value, value)
    else:
      raise errors.GraphError(
          f"sow: attribute {name!r} of {type(self).__name__} holds a "
          f"{type(current).__name__}, not a {variable_type.__name__}; use another name.")

  def perturb(self, name: str, value: Any,
              variable_type: type[Variable] = Perturbation) -> Any:
    """Adds a zero Variable `name` to `value`; its gradient is d(loss)/d(value)."""
    if name not in self.__dict__:
      setattr(self, name, variable_type(jnp.zeros_like(value)))
    return value + self.__dict__[name].value

  def iter_modules(self) -> Iterator[tuple[PathParts, "Module"]]:
    """Yields ``(path, module)`` for this Module and every sub-Module."""
    for path, node in graph.iter_graph(self):
      if isinstance(node, Module):
        yield path, node

  def iter_children(self) -> Iterator[tuple[Any, "Module"]]:
    """Yields ``(name, module)`` for direct sub-Module attributes."""
    for name, value in self.__dict__.items():
      if isinstance(value, Module):
        yield name, value

  def set_attributes(self, *filters, raise_if_not_found: bool = True,
                     **attributes: Any) -> None:
    """Sets attributes on this Module and sub-Modules that already have them.

    With filters, only Modules matching one of them are changed.

    Raises:
      GraphError: if an attribute exists on no (matching) Module and
        raise_if_not_found is True.
    """
    pred = filterlib.to_predicate(filters) if filters else None
    found = set()
    for path, module in self.iter_modules():
      if pred is not None and not pred(path, module):
        continue
      for name, value in attributes.items():
        if name in module.__dict__:
          setattr(module, name, value)
          found.add(name)
    missing = sorted(set(attributes) - found)
    if missing and raise_if_not_found:
      raise errors.GraphError(
          f"set_attributes: no Module in {type(self).__name__} has attribute(s) "
          f"{missing}; check the spelling or pass raise_if_not_found=False.")

  def train(self, **attributes: Any) -> None:
    """Training mode: ``deterministic=False``, ``use_running_average=False``."""
    self.set_attributes(deterministic=False, use_running_average=False,
                        **attributes, raise_if_not_found=False)

  def eval(self, **attributes: Any) -> None:
    """Evaluation mode: ``deterministic=True``, ``use_running_average=True``."""
    self.set_attributes(deterministic=True, use_running_average=True,
                        **attributes, raise_if_not_found=False)

  def __deepcopy__(self, memo):
    return graph.clone(self)

  def __repr__(self) -> str:
    return _repr_node(self, 0, set())


def _repr_node(node: Any, depth: int, seen: set) -> str:
  if isinstance(node, Variable):
    return repr(node)
  if not isinstance(node, Object):
    if isinstance(node, (list, tuple)) and graph.has_data(node):
      open_, close = ("[", "]") if isinstance(node, list) else ("(", ")")
      inner = [_repr_node(v, depth + 1, seen) for v in node]
      pad = "  " * (depth + 1)
      return open_ + "\n" + "".join(f"{pad}{s},\n" for s in inner) + "  " * depth + close
    return repr(node)
  if id(node) in seen:
    return f"<shared {type(node).__name__}>"
  seen.add(id(node))
  pad = "  " * (depth + 1)
  lines = [f"{type(node).__name__}("]
  for name, value in node.__dict__.items():
    lines.append(f"{pad}{name}={_repr_node(value, depth + 1, seen)},")
  lines.append("  " * depth + ")")
  return "\n".join(lines) if len(lines) > 2 else f"{type(node).__name__}()"


def reseed(node: Any, /, *, graph: bool | None = None, policy: Any = "scalars_only",
           **seeds: Any) -> None:
  """Reseeds the named Rngs streams everywhere in a graph (in place), as Flax does.

  Each matching stream's key becomes the next key of a fresh stream seeded
  with the given seed (``fold_in(key(seed), 0)``, so a layer that forked its
  stream at construction replays the same keys) and its counter restarts at
  0. ``graph`` is accepted for Flax compatibility.

  Args:
    policy: for streams holding a batch of keys: ``"scalars_only"`` (an
      error), ``"match_shape"`` (split the new key to the batch shape) or a
      callable ``(path, key, shape) -> key``.

  Raises:
    ConfigError: an unknown policy, or a batched stream under "scalars_only".

  >>> from spmdnnx._rngs import Rngs
  >>> r = Rngs(params=0); _ = r.params(); reseed(r, params=1)
  >>> int(r.params.count.value)
  0
  """
  del graph
  if policy == "scalars_only":
    policy = _scalars_only
  elif policy == "match_shape":
    policy = _match_shape
  elif not callable(policy):
    raise errors.ConfigError(
        f"reseed: policy must be 'scalars_only', 'match_shape' or a callable "
        f"(path, key, shape) -> key, got {policy!r}.", argument="policy")
  fresh = {tag: RngStream(seed, tag) for tag, seed in seeds.items()}
  for path, value in _iter_graph(node):
    if isinstance(value, RngStream) and value.tag in fresh:
      key = policy(path, fresh[value.tag](), tuple(value.key.value.shape))
      value.key.value = key
      value.count.value = jnp.zeros(key.shape, dtype=jnp.uint32)


def _scalars_only(path: PathParts, key: Any, shape: tuple) -> Any:
  if shape != ():
    raise errors.ConfigError(
        f"reseed: the stream at {errors.path_str(path)} holds a batch of keys of "
        f"shape {shape}; pass policy='match_shape' to split the new key to that "
        "shape, or a callable policy.", paths=[path], shapes=[shape])
  return key


def _match_shape(path: PathParts, key: Any, shape: tuple) -> Any:
  return key if shape == () else jax.random.split(key, shape)


def data(value: Any) -> Any:
  """Flax 0.12 marker for data attributes; a no-op here.

  spmdnnx decides data vs static by content (anything holding a Variable,
  Module or array is data), so ``self.layers = nnx.data([...])`` and
  ``self.layers = [...]`` behave the same.
  """
  return value
