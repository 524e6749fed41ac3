"""Lifted transforms: JAX transforms that accept graph objects."""

from spmdnnx._transforms.grad import DiffState as DiffState
from spmdnnx._transforms.grad import grad as grad
from spmdnnx._transforms.grad import value_and_grad as value_and_grad
from spmdnnx._transforms.jit import JitWrapped as JitWrapped
from spmdnnx._transforms.jit import jit as jit
from spmdnnx._transforms.jit_inflight import get_max_in_flight as get_max_in_flight
from spmdnnx._transforms.jit_inflight import set_max_in_flight as set_max_in_flight
from spmdnnx._transforms.axes import Carry as Carry
from spmdnnx._transforms.axes import StateAxes as StateAxes
from spmdnnx._transforms.rngs import split_rngs as split_rngs
from spmdnnx._transforms.vmap import vmap as vmap
from spmdnnx._transforms.control import cond as cond
from spmdnnx._transforms.control import fori_loop as fori_loop
from spmdnnx._transforms.control import switch as switch
from spmdnnx._transforms.control import while_loop as while_loop
from spmdnnx._transforms.prefixes import StateSharding as StateSharding
from spmdnnx._transforms.prefixes import prefix as prefix
from spmdnnx._transforms.misc import checkpoint_name as checkpoint_name
from spmdnnx._transforms.misc import eval_shape as eval_shape
from spmdnnx._transforms.misc import remat as remat
from spmdnnx._transforms.misc import resolve_policy as resolve_policy
from spmdnnx._transforms.misc import shard_map as shard_map
from spmdnnx._transforms.scan import scan as scan
from spmdnnx._transforms.guards import check_unbound as check_unbound
from spmdnnx._transforms.jit import Compiled as Compiled
from spmdnnx._transforms.jit import Lowered as Lowered
from spmdnnx._transforms.partials import cached_partial as cached_partial
from spmdnnx._transforms.partials import jit_partial as jit_partial
from spmdnnx._transforms.custom_vjp import custom_vjp as custom_vjp
from spmdnnx._transforms.autodiff import jvp as jvp
from spmdnnx._transforms.autodiff import vjp as vjp
from spmdnnx._transforms.compile_misc import checkify as checkify
from spmdnnx._transforms.compile_misc import make_jaxpr as make_jaxpr
from spmdnnx._transforms.compile_misc import pmap as pmap

from spmdnnx._transforms.iteration_modes import transform_metadata as transform_metadata
