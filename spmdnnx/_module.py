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

import copy
import functools
import inspect
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from spmdnnx import errors
from spmdnnx import _filters as filterlib
from spmdnnx import _graph as graph
from spmdnnx import _graph_api as graph_api
from spmdnnx._object import Object
from spmdnnx._graph import iter_graph as _iter_graph
from spmdnnx._rngs import RngStream
from spmdnnx._state import State
from spmdnnx._typing import PathParts
from spmdnnx._variables import Intermediate, Perturbation, RngState, Variable


def _append(xs: tuple, x: Any) -> tuple:
  return (*xs, x)


def _empty() -> tuple:
  return ()


class Module(Object):
  """Base class for layers and models (reference semantics, any attributes)."""

  def sow(self, variable_type: type[Variable] | str, name: str, value: Any,
          reduce_fn: Callable = _append, init_fn: Callable = _empty) -> bool:
    """Records `value` in a Variable attribute `name` (a tuple by default).

    Read the values back with ``nnx.pop(model, nnx.Intermediate)`` or
    ``nnx.state(model, nnx.Intermediate)``. Inside `capture`, the value goes
    to the capture instead (and nothing is stored when `variable_type` is
    not captured).

    Returns:
      Whether the value was recorded.

    Raises:
      GraphError: attribute `name` exists and is not a `variable_type` Variable.
    """
    if isinstance(variable_type, str):
      variable_type = Intermediate
    box = _capture_box(self, variable_type)
    if box is not _NOT_CAPTURING:
      if box is None:
        return False
      values = dict(box.value)
      values[name] = reduce_fn(values[name] if name in values else init_fn(), value)
      box.value = values
      return True
    current = self.__dict__.get(name)
    if current is None:
      setattr(self, name, variable_type(reduce_fn(init_fn(), value)))
    elif not isinstance(current, Variable):
      raise errors.GraphError(
          f"sow: expected attribute {name!r} of {type(self).__name__} to be a Variable, "
          f"got {type(current).__name__}; sow into another name.")
    elif type(current) is not variable_type:
      raise errors.GraphError(
          f"sow: expected attribute {name!r} of {type(self).__name__} to be of type "
          f"{variable_type.__name__}, got {type(current).__name__}; sow into another "
          "name or with that type.")
    else:
      current.value = reduce_fn(current.value, value)
    return True

  def perturb(self, name: str, value: Any,
              variable_type: type[Variable] = Perturbation) -> Any:
    """Adds a zero Variable `name` to `value`; its gradient is d(loss)/d(value).

    Inside `capture`, the perturbation lives in the capture (seeded from its
    ``init=``) instead of on the Module.
    """
    box = _capture_box(self, variable_type)
    if box is not _NOT_CAPTURING:
      if box is None:
        return value
      values = dict(box.value)
      if name not in values:
        values[name] = jnp.zeros_like(value)
        box.value = values
      return values[name] + value
    if name not in self.__dict__:
      setattr(self, name, variable_type(jnp.zeros_like(value)))
    return value + self.__dict__[name].value

  def iter_modules(self) -> Iterator[tuple[PathParts, "Module"]]:
    """Yields ``(path, module)`` for this Module and every sub-Module."""
    for path, node in graph.iter_graph(self, graph=True):
      if isinstance(node, Module):
        yield path, node

  def iter_children(self) -> Iterator[tuple[Any, "Module"]]:
    """Yields ``(name, module)`` for direct sub-Module attributes."""
    for name, value in self.__dict__.items():
      if isinstance(value, Module):
        yield name, value

  def set_attributes(self, *filters, raise_if_not_found: bool = True,
                     graph: bool | None = None, **attributes: Any) -> None:
    """Sets attributes on this Module and sub-Modules that already have them.

    With filters, only Modules matching one of them are changed. `graph`
    picks the traversal (graph mode reaches shared Modules once; tree mode
    refuses shared Variables); None: the mode in force.

    Raises:
      GraphError: if an attribute exists on no (matching) Module and
        raise_if_not_found is True.
    """
    pred = filterlib.to_predicate(filters) if filters else None
    found = set()
    for path, module in iter_modules(self, graph=graph):
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
          f"{missing}; check the spelling or pass raise_if_not_found=False. (Could "
          f"not find at least one instance of the following attributes: {missing})")

  def train(self, **attributes: Any) -> None:
    """Training mode: ``deterministic=False``, ``use_running_average=False``."""
    self.set_attributes(deterministic=False, use_running_average=False,
                        **attributes, raise_if_not_found=False)

  def eval(self, **attributes: Any) -> None:
    """Evaluation mode: ``deterministic=True``, ``use_running_average=True``."""
    self.set_attributes(deterministic=True, use_running_average=True,
                        **attributes, raise_if_not_found=False)

  def __deepcopy__(self, memo):
    # Static attributes are deep-copied too (a list stays a separate list).
    graphdef, state = graph.split(self, graph=True)
    return graph.merge(copy.deepcopy(graphdef, memo), state, copy=True)

  def __repr__(self) -> str:
    return _repr_node(self, 0, set())


_CAPTURES = "__captures__"
_NOT_CAPTURING = object()


def _capture_box(module: Module, variable_type: type) -> Any:
  """The capture Variable of `variable_type` on `module`, None, or _NOT_CAPTURING."""
  boxes = module.__dict__.get(_CAPTURES)
  if boxes is None:
    return _NOT_CAPTURING
  for box in boxes:
    if type(box) is variable_type:
      return box
  return None


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
  stats = _size_comment(node) if depth == 0 else ""
  lines = [f"{type(node).__name__}({stats}"]
  for name, value in node.__dict__.items():
    lines.append(f"{pad}{name}={_repr_node(value, depth + 1, seen)},")
  lines.append("  " * depth + ")")
  return "\n".join(lines) if len(lines) > 2 else f"{type(node).__name__}()"


def _size_comment(node: Object) -> str:
  """``"  # Param: 6 (24 B), ..., Total: ..."``: element counts and bytes per Variable type.

  Rng key and count Variables add up under ``RngState`` (as Flax NNX).
  """
  sizes: dict[str, list] = {}
  for _, var in graph.flat_pairs(node, graph=True)[1]:
    if not isinstance(var, Variable):
      continue
    name = "RngState" if isinstance(var, RngState) else type(var).__name__
    count, nbytes = sizes.setdefault(name, [0, 0])
    for leaf in jax.tree.leaves(var.value):
      shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
      if shape is None or dtype is None:
        continue
      n = math.prod(shape)
      count += n
      nbytes += n * _itemsize(dtype)
    sizes[name] = [count, nbytes]
  if not sizes:
    return ""
  parts = [f"{name}: {_size_str(*cb)}" for name, cb in sizes.items()]
  if len(sizes) > 1:
    parts.append("Total: " + _size_str(sum(c for c, _ in sizes.values()),
                                      sum(b for _, b in sizes.values())))
  return "  # " + ", ".join(parts)


def _itemsize(dtype: Any) -> int:
  try:
    return jnp.dtype(dtype).itemsize
  except TypeError:  # extended dtypes (typed PRNG keys)
    return getattr(dtype, "itemsize", 0) or 0


def _size_str(count: int, nbytes: int) -> str:
  value, unit = float(nbytes), "B"
  for next_unit in ("KB", "MB", "GB", "TB"):
    if value < 1000:
      break
    value, unit = value / 1000, next_unit
  size = f"{nbytes} B" if unit == "B" else f"{value:.1f} {unit}"
  return f"{count:,} ({size})"


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
  for path, value in _iter_graph(node, graph=True):
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


def iter_modules(node: Any, /, *, graph: bool | None = None) -> Iterator[tuple]:
  """Yields ``(path, module)`` for every Module in `node` (itself included), children first.

  >>> import spmdnnx as nnx
  >>> seq = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  >>> [p for p, _ in nnx.iter_modules(seq)]
  [('layers', 0), ()]
  """
  for path, value in graph_iter(node, graph=graph):
    if isinstance(value, Module):
      yield path, value


graph_iter = graph.iter_graph


def with_attributes(node: Any, /, *, only: Any = ..., raise_if_not_found: bool = True,
                    graph: bool | None = None, **attributes: Any) -> Any:
  """A copy of `node` whose Modules (matching `only`) have `attributes` set.

  Unlike `Module.set_attributes`, `node` is not modified; the copy shares
  its Variables. Only attributes a Module already has are set.

  Raises:
    GraphError: an attribute found on no selected Module (unless
      ``raise_if_not_found=False``).

  >>> import spmdnnx as nnx
  >>> d = nnx.Dropout(0.5, deterministic=False)
  >>> nnx.with_attributes(d, deterministic=True).deterministic, d.deterministic
  (True, False)
  """
  pred = filterlib.to_predicate(only)
  remaining = set(attributes)

  def set_on(path, x):
    if isinstance(x, Module) and pred(path, x):
      for name, value in attributes.items():
        if name in x.__dict__:
          setattr(x, name, value)
          remaining.discard(name)
    return x

  out = graph_api.recursive_map(set_on, node, graph=graph)
  if remaining and raise_if_not_found:
    raise errors.GraphError(
        "Could not find at least one instance of the following attributes: "
        f"{sorted(remaining)} in any selected Module of {type(node).__name__}; check "
        "the names or pass raise_if_not_found=False.")
  return out


def _view_params(method: Callable) -> tuple[set, bool]:
  params = inspect.signature(method).parameters.values()
  named = {p.name for p in params if p.kind in (
      inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
  return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def view(node: Any, /, *, only: Any = ..., raise_if_not_found: bool = True,
         graph: bool | None = None, **kwargs: Any) -> Any:
  """A copy of `node` in another mode, set through each Module's ``set_view``.

  Every selected Module that defines ``set_view(self, **options)`` gets the
  options its signature accepts (e.g. ``deterministic=``,
  ``use_running_average=``); a Module without ``set_view`` gets each option
  that names one of its static attributes set directly. `node` is not
  modified; the copy shares its Variables.

  Raises:
    GraphError: an option no selected Module accepts (unless
      ``raise_if_not_found=False``).

  >>> import spmdnnx as nnx
  >>> class Drop(nnx.Module):
  ...   def __init__(self):
  ...     self.deterministic = False
  ...   def set_view(self, deterministic=None):
  ...     if deterministic is not None:
  ...       self.deterministic = deterministic
  >>> d = Drop()
  >>> nnx.view(d, deterministic=True).deterministic, d.deterministic
  (True, False)
  """
  pred = filterlib.to_predicate(only)
  remaining = set(kwargs)

  def set_on(path, x):
    if not isinstance(x, Module) or not pred(path, x):
      return x
    method = getattr(x, "set_view", None)
    if method is None:  # no set_view: options naming an attribute set it
      for k, v in kwargs.items():
        if k in x.__dict__ and not graph_api.graphlib.has_data(x.__dict__[k]):
          setattr(x, k, v)
          remaining.discard(k)
      return x
    named, var_kw = _view_params(method)
    if var_kw:
      method(**kwargs)
      remaining.clear()
    else:
      method(**{k: v for k, v in kwargs.items() if k in named})
      remaining.difference_update(named)
    return x

  out = graph_api.recursive_map(set_on, node, graph=graph)
  if remaining and raise_if_not_found:
    raise errors.GraphError(
        f"Unused keys found in nnx.view: {sorted(remaining)}: no selected Module's "
        "set_view accepts them; see nnx.view_info(model) for the options.")
  return out


def view_info(node: Any, /, *, only: Any = ..., graph: bool | None = None) -> str:
  """Describes the ``set_view`` options of every Module class in `node`.

  One block per class (sorted by name): each option with its annotation and
  default, then its description from the method's ``Args:`` docstring.

  >>> import spmdnnx as nnx
  >>> class Drop(nnx.Module):
  ...   def set_view(self, deterministic: bool | None = None):
  ...     \"\"\"Sets the mode.
  ...
  ...     Args:
  ...       deterministic: disables dropout.
  ...     \"\"\"
  >>> print(nnx.view_info(Drop()))
  Drop:
    deterministic: bool | None = None
      disables dropout.
  """
  pred = filterlib.to_predicate(only)
  classes: set = set()

  def collect(path, x):
    if isinstance(x, Module) and hasattr(x, "set_view") and pred(path, x):
      classes.add(type(x))
    return x

  graph_api.recursive_map(collect, node, graph=graph)
  lines = []
  for cls in sorted(classes, key=lambda c: c.__qualname__):
    lines.append(f"{cls.__qualname__}:")
    sig = inspect.signature(cls.set_view)
    docs = _arg_docs(inspect.getdoc(cls.set_view) or "")
    for name, p in sig.parameters.items():
      if name == "self" or p.kind in (inspect.Parameter.VAR_KEYWORD,
                                      inspect.Parameter.VAR_POSITIONAL):
        continue
      ann = p.annotation
      ann = "" if ann is inspect.Parameter.empty else \
          f": {ann if isinstance(ann, str) else inspect.formatannotation(ann)}"
      default = "" if p.default is inspect.Parameter.empty else f" = {p.default}"
      lines.append(f"  {name}{ann}{default}")
      if name in docs:
        lines.append(docs[name])
      elif not docs:
        pass
  return "\n".join(lines)


def _arg_docs(doc: str) -> dict[str, str]:
  """``{arg: indented description}`` from a Google-style ``Args:`` section."""
  start = doc.find("Args:\n")
  if start < 0:
    return {}
  body = doc[start + 6:]
  end = body.find("Returns:")
  body = body if end < 0 else body[:end]
  out: dict[str, list] = {}
  current = None
  for line in body.split("\n"):
    if line.startswith("  ") and not line.startswith("    ") and ":" in line:
      current, desc = line.strip().split(":", 1)
      out[current] = ["    " + desc.strip()]
    elif current is not None and line.strip():
      out[current].append("    " + line.strip())
  return {k: "\n".join(v) for k, v in out.items()}


def capture(fn: Any, *var_types: type, init: Any = None,
            method_outputs: type | None = None) -> Callable:
  """Wraps `fn` so that what Modules `sow` / `perturb` during the call is returned.

  `fn` is a function whose first argument is the Module, a Module (its
  ``__call__``) or a bound method of a Module. The wrapper returns
  ``(result, state_1, ..., state_n)``: one State per type in `var_types`,
  holding what was sown, by Module path. Nothing is left on the Modules.
  ``capture(nnx.Intermediate)`` (types only) returns a decorator.

  Args:
    fn: the function, Module or bound method.
    *var_types: Variable types to capture (e.g. ``nnx.Intermediate``,
      ``nnx.Perturbation``).
    init: a State of earlier captured values to start from (e.g. the
      perturbations to differentiate against).
    method_outputs: also sow the output of every public method (and
      ``__call__``) of every Module, under the method's name, as this type.

  >>> import jax.numpy as jnp, spmdnnx as nnx
  >>> class Foo(nnx.Module):
  ...   def __call__(self, x):
  ...     self.sow(nnx.Intermediate, "h", x * 2)
  ...     return x
  >>> _, inter = nnx.capture(Foo(), nnx.Intermediate)(jnp.ones(1))
  >>> inter["h"].value[0].tolist()
  [2.0]
  """
  if isinstance(fn, type) and issubclass(fn, Variable):
    types = (fn, *var_types)
    return lambda actual: capture(actual, *types, init=init, method_outputs=method_outputs)
  if inspect.ismethod(fn) and isinstance(fn.__self__, Module):
    owner = fn.__self__
  elif isinstance(fn, Module):
    owner = fn
  else:
    owner = None

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    module = owner if owner is not None else args[0]
    seeded = _seeds_by_module(init)
    modules = list(iter_modules(module, graph=True))
    for path, m in modules:
      boxes = {t: {} for t in var_types}
      for name, var in seeded.get(path, {}).items():
        boxes.setdefault(type(var), {})[name] = var.value
      setattr(m, _CAPTURES, tuple(t(v) for t, v in boxes.items()))
    patched = _patch_methods({type(m) for _, m in modules}, method_outputs) \
        if method_outputs else []
    try:
      result = fn(*args, **kwargs)
    finally:
      for cls, name, original in patched:
        setattr(cls, name, original)
      pairs = []
      for path, m in iter_modules(module, graph=True):
        boxes = m.__dict__.get(_CAPTURES)
        if boxes is None:
          continue
        for box in boxes:
          if type(box) in var_types:
            pairs.extend((path + (k,), type(box)(v)) for k, v in box.value.items())
        delattr(m, _CAPTURES)
    if not var_types:
      return result
    # One State per type, by exact type (a Perturbation is also an Intermediate).
    states = [State.from_flat_path([(p, v) for p, v in pairs if type(v) is t])
              for t in var_types]
    return (result, *states)

  return wrapper


def _seeds_by_module(init: Any) -> dict:
  if init is None:
    return {}
  flat = init.flat_state() if isinstance(init, State) else State(init).flat_state()
  out: dict = {}
  for path, var in flat:
    if isinstance(var, Variable):
      out.setdefault(path[:-1], {})[path[-1]] = var
  return out


def _patch_methods(classes: set, variable_type: type) -> list:
  """Wraps the public methods of `classes` to sow their outputs; returns the undo list."""
  undo = []
  for cls in classes:
    for name, method in list(cls.__dict__.items()):
      if not callable(method) or isinstance(method, type) or (
          name.startswith("_") and name != "__call__"):
        continue

      def sowing(self, *a, __m=method, __n=name, **k):
        out = __m(self, *a, **k)
        self.sow(variable_type, __n, out)
        return out

      functools.update_wrapper(sowing, method)
      undo.append((cls, name, method))
      setattr(cls, name, sowing)
  return undo
