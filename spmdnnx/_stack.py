"""`Stack`: N identical blocks as one Module, applied by scanning over layers.

Deep models repeat one block. A `Stack` holds a single block whose Variables
all carry a leading *stacked* axis of size ``num_layers``, named ``"layers"``
(configurable) in their ``logical_axes``, so axis rules, optimizers,
checkpoints and sharding reports see it like any other axis. Calling the stack
scans the block over that axis: the program contains one copy of the block, so
compile time does not grow with depth, and under FSDP each step gathers only
its own layer's weights.

How it maps onto the lifted transforms:

* construction is ``split_rngs(splits=num_layers)`` around
  ``vmap(make_block)``: every Rngs stream is split so each layer draws its
  own keys, and `vmap` stacks the new Variables and inserts the axis name;
* a call is ``scan`` over the block (``in_axes=(0, Carry, None, 0, ...)``,
  ``out_axes=(Carry, 0)``): state is sliced per layer (the name is removed
  inside, restored outside) and updates made in the body (BatchNorm
  statistics, Dropout key counters) are stacked back;
* ``remat="full"`` (or any policy name of `resolve_policy`) wraps the scanned
  body in `remat`.

>>> import jax.numpy as jnp
>>> import spmdnnx as nnx
>>> from spmdnnx.nn import Linear
>>> class Block(nnx.Module):
...   def __init__(self, rngs):
...     self.lin = Linear(4, 4, kernel_axes=("embed", "mlp"), rngs=rngs)
...   def __call__(self, x):
...     return jnp.tanh(self.lin(x))
>>> stack = Stack(lambda rngs: Block(rngs), 3, rngs=nnx.Rngs(0))
>>> stack.block.lin.kernel.shape, stack.block.lin.kernel.logical_axes
((3, 4, 4), ('layers', 'embed', 'mlp'))
>>> stack(jnp.ones((2, 4))).shape
(2, 4)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spmdnnx import errors
from spmdnnx import _graph as graph
from spmdnnx._module import Module
from spmdnnx._pipeline import PipelineConfig
from spmdnnx._pipeline import pipeline_stages
from spmdnnx._pipeline import run_pipeline
from spmdnnx._rngs import Rngs
from spmdnnx._stacked import LAYERS_AXIS
from spmdnnx._stack_convert import check_same_structure
from spmdnnx._stack_convert import slice_variable
from spmdnnx._stack_convert import stack_variables
from spmdnnx._state import State
from spmdnnx._transforms import Carry
from spmdnnx._transforms import remat as remat_transform
from spmdnnx._transforms import resolve_policy
from spmdnnx._transforms import scan
from spmdnnx._transforms import split_rngs
from spmdnnx._transforms import vmap
from spmdnnx._variables import Variable
from spmdnnx.spmd import _context as context_lib

#: Remat policy names a Stack accepts (besides None and policy callables).
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_without_batch_dims",
                  "save_only_named")


def _is_positive_int(x: Any) -> bool:
  return not isinstance(x, bool) and isinstance(x, (int, np.integer)) and x > 0


def _check_config(num_layers: Any, stack_axis: Any, remat: Any, names: Any,
                  unroll: Any, pipeline: Any = None) -> tuple[str, ...]:
  """Validates Stack's configuration; returns ``names`` as a tuple."""
  if pipeline is not None and not isinstance(pipeline, PipelineConfig):
    raise errors.ConfigError(
        f"Stack: pipeline must be None or an nnx.PipelineConfig(microbatches=..., "
        f"repeats=...), got {pipeline!r}.")
  if pipeline is not None and _is_positive_int(num_layers) \
      and num_layers % pipeline.repeats:
    raise errors.ConfigError(
        f"Stack: num_layers={num_layers} is not divisible by pipeline repeats="
        f"{pipeline.repeats}; every round over the stages needs the same number of "
        "layers.")
  if not _is_positive_int(num_layers):
    raise errors.ConfigError(
        f"Stack: num_layers must be a positive int, got {num_layers!r}.")
  if not isinstance(stack_axis, str) or not stack_axis:
    raise errors.ConfigError(
        f"Stack: stack_axis must be a non-empty logical axis name such as 'layers', "
        f"got {stack_axis!r}.")
  if not (unroll is True or _is_positive_int(unroll)):
    raise errors.ConfigError(
        f"Stack: unroll must be a positive int (layers per loop iteration) or True "
        f"(unroll fully), got {unroll!r}.")
  names = (names,) if isinstance(names, str) else tuple(names)
  if remat == "save_only_named" and not names:
    raise errors.ConfigError(
        "Stack: remat='save_only_named' needs names=(...) listing the activations "
        "tagged with nnx.checkpoint_name(x, name) to keep.")
  if remat is not None and remat != "none":
    try:
      resolve_policy(remat, names)
    except errors.TransformError:
      raise errors.ConfigError(
          f"Stack: unknown remat policy {remat!r}; use None or one of "
          f"{list(REMAT_POLICIES)}, or a jax.checkpoint_policies callable.") from None
  return names


def _same_avals(a: Any, b: Any) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      jnp.shape(x) == jnp.shape(y) and jnp.result_type(x) == jnp.result_type(y)
      for x, y in zip(la, lb))


def _describe(tree: Any) -> str:
  leaves = jax.tree.leaves(tree)
  return ", ".join(f"{jnp.result_type(x).name}{list(jnp.shape(x))}" for x in leaves) or "()"


def _is_dynamic(x: Any) -> bool:
  return graph.is_graph_node(x) or isinstance(x, (jax.Array, np.ndarray)) \
      or isinstance(x, jax.core.Tracer)


class Stack(Module):
  """``num_layers`` copies of one block, stacked along a named leading axis.

  Args:
    make_block: ``rngs -> Module``; builds one layer from the Rngs it is given
      (use that argument, not an Rngs from an enclosing scope).
    num_layers: number of layers (> 0).
    rngs: the `Rngs` the layers are initialised from; each stream is split
      into ``num_layers`` keys, so every layer gets distinct weights and its
      own Dropout keys. The streams advance, so a second Stack differs.
    stack_axis: logical name of the stacked axis (``"layers"``); axis rules
      resolve it like any name (replicated by default, ``rules.override(
      layers="stage")`` for pipeline placement).
    remat: None (no rematerialisation) or a policy name: ``"none"``,
      ``"full"``, ``"save_dots"``, ``"save_dots_without_batch_dims"``,
      ``"save_only_named"`` (with ``names``), or a `jax.checkpoint_policies`
      callable. Applied to one layer of the scan.
    names: activation names kept by ``"save_only_named"`` (tag them in the
      block with `checkpoint_name`).
    unroll: layers per loop iteration of the scan (True: a fully unrolled loop).
    pipeline: a `PipelineConfig` to run the layers as a pipeline over the
      ``stage`` mesh axis when called inside ``use_sharding`` on a mesh with
      ``stage > 1`` (see `spmdnnx._pipeline` and docs/pipeline.md); elsewhere
      the stack scans as usual. Calls with per-layer inputs (KV-cache
      decoding) always scan.

  Attributes:
    block: the stacked block; ``block.<...>.shape[0] == num_layers``.

  Raises:
    ConfigError: ``num_layers <= 0``, an unknown remat policy, a bad
      ``unroll``, ``stack_axis`` or ``pipeline``, or ``make_block`` not
      returning a Module.

  Calling ``stack(carry, *per_layer, **broadcast)`` runs layer ``i`` as
  ``block_i(carry, *[x[i] for x in per_layer], **broadcast)``. The block
  returns the next carry (same structure, shapes and dtypes), or a pair
  ``(carry, y)``; then the stack returns ``(carry, ys)`` with every leaf of
  ``ys`` stacked along a leading ``num_layers`` axis.

  >>> import jax.numpy as jnp
  >>> import spmdnnx as nnx
  >>> class Scale(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.w = nnx.Param(jax.random.uniform(rngs.params(), (2,)))
  ...   def __call__(self, x, bias):
  ...     return x * self.w + bias, x.sum()
  >>> stack = Stack(Scale, 4, rngs=nnx.Rngs(0), remat="full")
  >>> x, sums = stack(jnp.ones(2), jnp.arange(4.0)[:, None])
  >>> x.shape, sums.shape
  ((2,), (4,))
  """

  def __init__(self, make_block: Callable[[Rngs], Any], num_layers: int, *, rngs: Rngs,
               stack_axis: str = LAYERS_AXIS, remat: Any = None, names: Sequence[str] = (),
               unroll: int | bool = 1, pipeline: PipelineConfig | None = None):
    names = _check_config(num_layers, stack_axis, remat, names, unroll, pipeline)
    if not isinstance(rngs, Rngs):
      raise errors.ConfigError(
          f"Stack: rngs must be an nnx.Rngs (split per layer), got {type(rngs).__name__}.")
    num_layers = int(num_layers)

    @split_rngs(splits=num_layers)
    @vmap(in_axes=0, out_axes=0, stack_axis=stack_axis)
    def create(layer_rngs):
      return make_block(layer_rngs)

    block = create(rngs)
    if not isinstance(block, Module):
      raise errors.ConfigError(
          f"Stack: make_block must return a Module (one layer), got "
          f"{type(block).__name__}.")
    self._configure(block, num_layers, stack_axis, remat, names, unroll, pipeline)

  def _configure(self, block: Module, num_layers: int, stack_axis: str, remat: Any,
                 names: tuple, unroll: Any, pipeline: Any = None) -> None:
    self.num_layers = num_layers
    self.pipeline = pipeline
    self.stack_axis = stack_axis
    self.remat = remat
    self.names = names
    self.unroll = unroll
    self.block = block

  # --- conversion ----------------------------------------------------------------

  @classmethod
  def from_blocks(cls, blocks: Sequence[Module], *, stack_axis: str = LAYERS_AXIS,
                  remat: Any = None, names: Sequence[str] = (),
                  unroll: int | bool = 1,
                  pipeline: PipelineConfig | None = None) -> "Stack":
    """Stacks independent blocks of identical structure into a `Stack`.

    Values are stacked along a new leading axis whose name is inserted into
    every annotated Variable's ``logical_axes``; applying the result equals
    applying the blocks one after another.

    Args:
      blocks: a non-empty sequence of Modules with the same structure (types,
        attributes, Variable paths, shapes, dtypes and metadata).
      stack_axis, remat, names, unroll, pipeline: as in `Stack`.

    Returns:
      A new Stack; the blocks are not modified or shared.

    Raises:
      ConfigError: no blocks, blocks that are not Modules, blocks that share
        Variables, or whose structure differs (every difference is listed).

    >>> import spmdnnx as nnx
    >>> from spmdnnx.nn import Linear
    >>> blocks = [Linear(2, 2, rngs=nnx.Rngs(i)) for i in range(3)]
    >>> Stack.from_blocks(blocks).block.kernel.shape
    (3, 2, 2)
    """
    blocks = list(blocks)
    if not blocks:
      raise errors.ConfigError("Stack.from_blocks: got no blocks; pass at least one.")
    names = _check_config(len(blocks), stack_axis, remat, names, unroll, pipeline)
    bad = [f"{i} ({type(b).__name__})" for i, b in enumerate(blocks)
           if not isinstance(b, Module)]
    if bad:
      raise errors.ConfigError(
          f"Stack.from_blocks: every block must be a Module; not Modules: "
          f"{errors.format_paths(bad)}.")
    splits = [graph.split(b) for b in blocks]
    _check_shared(blocks)
    check_same_structure([s for _, s in splits], [g for g, _ in splits],
                         "Stack.from_blocks", "block")
    graphdef = splits[0][0]
    flat = [s.flat_state() for _, s in splits]
    stacked = [(path, stack_variables([f[k][1] for f in flat], stack_axis))
               for k, (path, _) in enumerate(flat[0])]
    block = graph.merge(graphdef, State.from_flat_path(stacked))
    stack = cls.__new__(cls)
    stack._configure(block, len(blocks), stack_axis, remat, names, unroll, pipeline)
    return stack

  def to_blocks(self) -> list:
    """Independent per-layer copies of the block (the inverse of `from_blocks`).

    Each block's Variables are the layer's slice with the stacked axis name
    removed from ``logical_axes``; applying them in order equals applying
    the stack. Changes to the copies do not affect the stack.

    >>> import spmdnnx as nnx
    >>> from spmdnnx.nn import Linear
    >>> stack = Stack(lambda r: Linear(2, 3, rngs=r), 4, rngs=nnx.Rngs(0))
    >>> [b.kernel.shape for b in stack.to_blocks()][:2]
    [(2, 3), (2, 3)]
    """
    graphdef, state = graph.split(self.block)
    flat = state.flat_state()
    return [graph.merge(graphdef, State.from_flat_path(
        [(p, slice_variable(v, i, self.stack_axis)) for p, v in flat]))
            for i in range(self.num_layers)]

  # --- application ---------------------------------------------------------------

  def __call__(self, carry: Any, *per_layer: Any, **broadcast: Any) -> Any:
    """Applies the layers in order to ``carry`` (see the class doc).

    Args:
      carry: the value threaded through the layers (any pytree of arrays).
      *per_layer: pytrees of arrays with a leading ``num_layers`` axis; layer
        ``i`` receives slice ``i`` of each as an extra positional argument.
      **broadcast: keyword arguments given unchanged to every layer (arrays,
        Python values such as ``deterministic=True``, or graph objects such
        as an `Rngs`, whose updates are threaded from layer to layer).

    Returns:
      The final carry, or ``(carry, ys)`` if the block returns ``(carry, y)``.

    Pipelined (``pipeline`` set, a mesh with ``stage > 1`` active, no
    per-layer inputs): the carry and the ``batch_kwargs`` are split into
    microbatches and the block must return only the carry.

    Raises:
      TransformError: a per-layer input whose leading axis is not
        ``num_layers``, or a block that returns a carry of another structure,
        shape or dtype.
      ConfigError, ShapeError: pipelined, with layers not divisible by
        stages x repeats, fewer microbatches than stages, or a batch not
        divisible by the microbatches.
    """
    self._check_per_layer(per_layer)
    policy = None if self.remat in (None, "none") else resolve_policy(self.remat, self.names)
    ctx = context_lib.current_context()
    if self.pipeline is not None and not per_layer and ctx is not None \
        and pipeline_stages(ctx.mesh) > 1:
      return run_pipeline(self.block, carry, broadcast, config=self.pipeline,
                          num_layers=self.num_layers, stack_axis=self.stack_axis,
                          policy=policy, mesh=ctx.mesh)
    leaves, treedef = jax.tree_util.tree_flatten(broadcast, is_leaf=graph.is_graph_node)
    dynamic = [x if _is_dynamic(x) else None for x in leaves]
    static = [None if _is_dynamic(x) else x for x in leaves]
    cell: dict = {}

    def layer(block, carry, dyn, *xs):
      kwargs = jax.tree_util.tree_unflatten(
          treedef, [d if s is None else s for d, s in zip(dyn, static)])
      out = block(carry, *xs, **kwargs)
      new_carry, y, has_y = _split_output(out, carry)
      cell["has_y"] = has_y
      return new_carry, y

    step = layer if policy is None else remat_transform(layer, policy=policy)
    in_axes = (0, Carry, None) + (0,) * len(per_layer)
    scanned = scan(step, in_axes=in_axes, out_axes=(Carry, 0), unroll=self.unroll,
                   stack_axis=self.stack_axis)
    carry, ys = scanned(self.block, carry, dynamic, *per_layer)
    return (carry, ys) if cell["has_y"] else carry

  def _check_per_layer(self, per_layer: tuple) -> None:
    bad = []
    for i, x in enumerate(per_layer):
      for path, leaf in jax.tree_util.tree_flatten_with_path(x)[0]:
        shape = jnp.shape(leaf)
        if not shape or shape[0] != self.num_layers:
          bad.append(f"argument {i + 1}{jax.tree_util.keystr(path)} (shape {tuple(shape)})")
    if bad:
      raise errors.TransformError(
          f"Stack: per-layer inputs need a leading axis of size num_layers="
          f"{self.num_layers}; these do not have it: {errors.format_paths(bad)}. Pass "
          "values shared by every layer as keyword arguments instead.")


def _split_output(out: Any, carry: Any) -> tuple:
  """(new_carry, y, has_y) from a block's output: a carry or (carry, y)."""
  carry_def = jax.tree_util.tree_structure(carry)
  if jax.tree_util.tree_structure(out) == carry_def:
    new_carry, y, has_y = out, (), False
  elif isinstance(out, tuple) and len(out) == 2 and \
      jax.tree_util.tree_structure(out[0]) == carry_def:
    new_carry, y, has_y = out[0], out[1], True
  else:
    raise errors.TransformError(
        f"Stack: the block must return the next carry (structure {carry_def}) or a "
        f"pair (carry, y); it returned structure {jax.tree_util.tree_structure(out)}. "
        "A carry keeps its structure from layer to layer.")
  if not _same_avals(new_carry, carry):
    raise errors.TransformError(
        f"Stack: the block changes the carry's shape or dtype: it receives "
        f"({_describe(carry)}) and returns ({_describe(new_carry)}). Every layer "
        "must return a carry shaped like its input (project or cast inside the "
        "block, or apply the changing layer outside the stack).")
  return new_carry, y, has_y


def _check_shared(blocks: list) -> None:
  """Raises if two blocks share a Variable (a stack holds independent layers)."""
  owner: dict[int, tuple] = {}
  shared = []
  for i, b in enumerate(blocks):
    for path, node in graph.iter_graph(b):
      if isinstance(node, Variable):
        j = owner.setdefault(id(node), (i, path))
        if j[0] != i:
          shared.append(f"{errors.path_str(path)} (blocks {j[0]} and {i})")
  if shared:
    raise errors.ConfigError(
        f"Stack.from_blocks: blocks share Variables: {errors.format_paths(shared)}; "
        "a stack holds one independent copy per layer. Clone the blocks "
        "(nnx.clone) or keep shared parameters outside the stack.")
