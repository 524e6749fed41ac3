"""`remat` and `eval_shape` over graph objects (`shard_map` lives in `shmap`).

>>> import jax.numpy as jnp
>>> from spmdnnx._module import Module
>>> from spmdnnx._variables import Param
>>> class Lin(Module):
...   def __init__(self, n):
...     self.w = Param(jnp.ones((n, n)), logical_axes=("embed", "mlp"))
>>> abstract = eval_shape(lambda: Lin(1024))
>>> abstract.w.value.shape, abstract.w.logical_axes
((1024, 1024), ('embed', 'mlp'))
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jax.ad_checkpoint import checkpoint_name as _jax_checkpoint_name

from spmdnnx import errors
from spmdnnx._transforms import guards
from spmdnnx._transforms import jit_plan
from spmdnnx._transforms import lift
from spmdnnx._transforms.prefixes import StateSharding  # noqa: F401 (re-exported name)
from spmdnnx._transforms.shmap import shard_map  # noqa: F401 (re-exported name)

#: Remat policies by name (see `jax.checkpoint_policies`).
POLICIES = {
    "none": None,  # no remat
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "save_dots_without_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def resolve_policy(policy: Any, names: tuple[str, ...] = ()) -> Any:
  """Turns a policy name ('full', 'save_dots', 'save_only_named', ...) into a policy.

  Raises:
    TransformError: for an unknown name.
  """
  if policy is None or callable(policy):
    return policy
  if policy == "save_only_named":
    return jax.checkpoint_policies.save_only_these_names(*names)
  if policy in POLICIES:
    return POLICIES[policy]
  raise errors.TransformError(
      f"Unknown remat policy {policy!r}; use one of "
      f"{sorted(POLICIES) + ['save_only_named']} or a jax.checkpoint_policies callable.")


def checkpoint_name(x: Any, name: str) -> Any:
  """Tags an activation so policy 'save_only_named' can keep it."""
  return _jax_checkpoint_name(x, name)


def _lifted(f: Callable, what: str, transform: Callable, *, update: bool = True,
            who: str = "transform", updates: bool = True) -> Callable:
  """Lifts `f` through `transform(inner)(state_vals, plain_leaves)`.

  With ``updates=False`` (tree mode or graph_updates=False) an object or
  Variable reachable twice, a structure change or a returned input is an error.
  """

  @functools.wraps(f)
  def wrapper(*args):
    ex = lift.extract(tuple(args), aliasing=updates, who=who)
    plain = lift.plain_leaves(ex)
    cell: dict = {}

    def inner(leaves, plain_leaves):
      new_leaves, restructure, out, has_nodes = lift.run_inside(
          ex.graphdef, ex.treedef, leaves, lift.fill_plain(ex, plain_leaves),
          lambda call_args: f(*call_args), what, identity="moved")
      cell["restructure"], cell["has_nodes"] = restructure, has_nodes
      return new_leaves, out

    new_leaves, out = transform(inner)(list(ex.leaves), plain)
    write = update
    if not updates and jit_plan.only_moved(cell["restructure"], ex.graphdef):
      # Objects swapped inside: the moves are dropped, values follow identity.
      if update:
        jit_plan.write_moved(ex.all_nodes, new_leaves, cell["restructure"])
      write, cell["restructure"] = False, None
    if not updates:
      r = cell["restructure"]
      if r is not None and list(r.paths) == list(ex.paths):
        cell["restructure"] = None   # only static attributes changed: dropped, as Flax
      guards.check_kept_structure(cell["restructure"], who, lift.fun_name(f))
      if cell["has_nodes"]:
        guards.check_no_returned_inputs(out, who, lift.fun_name(f))
    if write:
      lift.apply_updates(ex, new_leaves, cell["restructure"])
    if cell["has_nodes"]:
      out = lift.unmark_outputs(ex.nodes, out)
    return out

  return wrapper


def remat(f: Callable | None = None, *, prevent_cse: bool = True, policy: Any = None,
          static_argnums: tuple = (), names: tuple[str, ...] = (),
          graph: bool | None = None, graph_updates: bool | None = None) -> Callable:
  """Rematerialisation (`jax.checkpoint`) that accepts graph objects.

  Args:
    policy: a `jax.checkpoint_policies` callable or a name from `POLICIES`
      (or ``"save_only_named"`` together with ``names``).
    names: for ``policy="save_only_named"``: the `checkpoint_name` tags of
      the activations to keep.

  Raises:
    TransformError: an unknown policy name, or ``"save_only_named"`` without
      ``names`` (which would silently save nothing).
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  if f is None:
    return functools.partial(remat, prevent_cse=prevent_cse, policy=policy,
                             static_argnums=static_argnums, names=names, graph=graph,
                             graph_updates=graph_updates)
  guards.check_unbound(f, "remat")
  if policy == "save_only_named" and not names:
    raise errors.TransformError(
        "remat: policy='save_only_named' needs names=(...) listing the "
        "checkpoint_name tags to keep; without them nothing is saved.")
  pol = resolve_policy(policy, tuple(names))
  if static_argnums:
    raise errors.TransformError(
        "remat: static_argnums is not supported for lifted remat; close over the "
        "static values with functools.partial instead.")
  return _lifted(f, f"remat({lift.fun_name(f)})",
                 lambda inner: jax.checkpoint(inner, prevent_cse=prevent_cse, policy=pol),
                 who="remat", updates=graph and graph_updates)


def eval_shape(f: Callable, *args: Any, graph: bool | None = None,
               graph_updates: bool | None = None, **kwargs: Any) -> Any:
  """Runs `f` abstractly; Modules it returns hold ShapeDtypeStructs, metadata kept.

  The arguments are not modified. With ``graph=False`` or
  ``graph_updates=False`` a Variable passed twice or returned is an error.

  Raises:
    TransformError: `f` is a bound method, or the mode's rules are broken.
  """
  graph, graph_updates = guards.resolve_modes(graph, graph_updates)
  guards.check_unbound(f, "eval_shape")
  call = (lambda *a: f(*a[:-1], **a[-1])) if kwargs else f
  call_args = args + (kwargs,) if kwargs else args
  return _lifted(call, f"eval_shape({lift.fun_name(f)})",
                 lambda inner: functools.partial(jax.eval_shape, inner), update=False,
                 who="eval_shape", updates=graph and graph_updates)(*call_args)
