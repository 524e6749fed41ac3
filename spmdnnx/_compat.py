"""`nnx.compat`: graph-mode defaults for the graph functions and transforms.

Each name here is the function of the same name with ``graph=True`` (and,
for transforms, ``graph_updates=True``) as its default, whatever
`spmdnnx.set_graph_mode` says, so code written for graph mode keeps its
meaning inside a tree-mode program. Explicit keywords still win.

>>> import spmdnnx as nnx
>>> p = nnx.Param(1.0)
>>> with nnx.set_graph_mode(False):
...   gd, state = nnx.compat.split([p, p])   # sharing allowed: graph mode
>>> len(nnx.to_flat_state(state))
1
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from spmdnnx import _graph
from spmdnnx import _graph_api
from spmdnnx import _module
from spmdnnx import _abstract
from spmdnnx import _transforms


def _graph_default(fn: Callable, updates: bool) -> Callable:
  """`fn` with graph=True (and graph_updates=True) defaults, for the keywords it takes."""
  params = inspect.signature(fn).parameters
  defaults = {}
  if "graph" in params:
    defaults["graph"] = True
  if updates and "graph_updates" in params:
    defaults["graph_updates"] = True
  if not defaults:
    return fn
  return functools.wraps(fn)(functools.partial(fn, **defaults))


split = _graph_default(_graph.split, False)
state = _graph_default(_graph.state, False)
clone = _graph_default(_graph.clone, False)
graphdef = _graph_default(_graph.graphdef, False)
iter_graph = _graph_default(_graph.iter_graph, False)
iter_children = _graph_default(_graph.iter_children, False)
recursive_map = _graph_default(_graph_api.recursive_map, False)
unpack = _graph_default(_graph_api.unpack, False)
map = _graph_default(_graph_api.map, False)  # noqa: A001 (Flax's name)
view = _graph_default(_module.view, False)
view_info = _graph_default(_module.view_info, False)
iter_modules = _graph_default(_module.iter_modules, False)
with_attributes = _graph_default(_module.with_attributes, False)

jit = _graph_default(_transforms.jit, True)
shard_map = _graph_default(_transforms.shard_map, True)
grad = _graph_default(_transforms.grad, True)
value_and_grad = _graph_default(_transforms.value_and_grad, True)
remat = _graph_default(_transforms.remat, True)
vmap = _graph_default(_transforms.vmap, True)
scan = _graph_default(_transforms.scan, True)
while_loop = _graph_default(_transforms.while_loop, True)
fori_loop = _graph_default(_transforms.fori_loop, True)
eval_shape = _graph_default(_transforms.eval_shape, True)
cond = _graph_default(_transforms.cond, True)
switch = _graph_default(_transforms.switch, True)
split_rngs = _graph_default(_transforms.split_rngs, True)
custom_vjp = _graph_default(_transforms.custom_vjp, True)
vjp = _graph_default(_transforms.vjp, True)
jvp = _graph_default(_transforms.jvp, True)
checkify = _graph_default(_transforms.checkify, True)
pmap = _graph_default(_transforms.pmap, True)
jit_partial = _graph_default(_transforms.jit_partial, True)
cached_partial = _graph_default(_transforms.cached_partial, True)
get_abstract_model = _graph_default(_abstract.get_abstract_model, False)
