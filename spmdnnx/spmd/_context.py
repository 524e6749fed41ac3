"""The ambient sharding context: which mesh and axis rules are in force.

`use_sharding` pushes a (mesh, rules) pair on a per-thread stack for the
duration of a ``with`` block; `current_context` reads the innermost one. On a mesh whose axes are all
`AxisType.Explicit` the block also makes the mesh current (``jax.set_mesh``).
Sharded init, `get_named_sharding`, `constrain`, batch helpers and the lifted
`jit` all use it when not given a mesh or rules explicitly.

>>> from spmdnnx.spmd._mesh import MeshConfig, make_mesh
>>> with use_sharding(make_mesh(MeshConfig(fsdp=-1)), "fsdp"):
...   current_context().rules.name
'fsdp'
>>> current_context() is None
True
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator

import jax
from jax.sharding import AxisType, Mesh

from spmdnnx import _eager
from spmdnnx import errors
from spmdnnx.spmd import _rules as rules_lib


@dataclasses.dataclass(frozen=True)
class ShardingContext:
  """One active `use_sharding` block.

  Attributes:
    mesh: a `jax.sharding.Mesh` (or `AbstractMesh` for planning), or None
      when only rules were given.
    rules: the `AxisRules`.
  """

  mesh: Any
  rules: rules_lib.AxisRules


class _Stack(threading.local):

  def __init__(self):
    self.items: list[ShardingContext] = []


_STACK = _Stack()


def current_context() -> ShardingContext | None:
  """The innermost active sharding context of this thread, or None."""
  items = _STACK.items
  return items[-1] if items else None


@contextlib.contextmanager
def use_sharding(mesh: Any, rules: Any) -> Iterator[ShardingContext]:
  """Makes ``mesh`` and ``rules`` the ambient sharding context.

  Args:
    mesh: a Mesh or AbstractMesh (None for rules-only planning).
    rules: `AxisRules`, a list of pairs, a dict, or a shipped preset name
      such as ``"fsdp_tp"``.

  Yields:
    The `ShardingContext`.

  Raises:
    AxisRulesError: if the rules name a mesh axis the mesh lacks.
  """
  rules = rules_lib.as_rules(rules)
  if mesh is not None:
    rules.validate(mesh)
  ctx = ShardingContext(mesh, rules)
  with contextlib.ExitStack() as stack:
    if _is_explicit(mesh):
      # Explicit axes: JAX's own APIs (reshard, out_sharding=P(...), auto_axes)
      # need the mesh to be current, so the block also sets it.
      stack.enter_context(jax.set_mesh(mesh))
    _STACK.items.append(ctx)
    try:
      yield ctx
    finally:
      _STACK.items.pop()


def _is_explicit(mesh: Any) -> bool:
  types = getattr(mesh, "axis_types", ()) if isinstance(mesh, Mesh) else ()
  return bool(types) and all(t == AxisType.Explicit for t in types)


def mesh_and_rules(mesh: Any = None, rules: Any = None, *, need_mesh: bool = True,
                 what: str = "this call") -> tuple[Any, rules_lib.AxisRules]:
  """The mesh and rules a call uses: its explicit arguments, else the ambient context's.

  Args:
    mesh, rules: what the caller passed (None: take the context's).
    need_mesh: whether a mesh is required (rules always are).
    what: the caller's name, for the message.

  Returns:
    ``(mesh, rules)`` with rules coerced to `AxisRules`.

  Raises:
    ShardingError: when neither the arguments nor the context provide them.
  """
  ctx = current_context()
  if mesh is None and ctx is not None:
    mesh = ctx.mesh
  if rules is None and ctx is not None:
    rules = ctx.rules
  if rules is None or (need_mesh and mesh is None):
    lacking = " and ".join(n for n, v in (("mesh", mesh if need_mesh else 1), ("rules", rules))
                           if v is None)
    raise errors.ShardingError(
        f"{what} needs {lacking}: pass them as arguments or run inside "
        "`with spmdnnx.use_sharding(mesh, rules):`.", missing=lacking.split(" and "),
        what=what)
  return mesh, rules_lib.as_rules(rules)


def _resolve_new_variable(logical_axes: tuple, shape: tuple) -> tuple | None:
  """Eager sharding's view of the context: ``(mesh, spec)`` for new Variables.

  A Variable created under ``jax.set_mesh`` inside ``use_sharding`` is placed
  by this context's rules (see spmdnnx/_eager.py); None outside any context.
  """
  ctx = current_context()
  if ctx is None:
    return None
  spec = ctx.rules.resolve(logical_axes, shape, ctx.mesh, path=("<new Variable>",))
  return ctx.mesh, spec


_eager.set_context_resolver(_resolve_new_variable, rules_lib.LOGICAL_AXES)
