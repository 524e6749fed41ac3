"""Lifted transforms: JAX transforms that accept graph objects."""

from spmdnnx.transforms.grad import DiffState as DiffState
from spmdnnx.transforms.grad import grad as grad
from spmdnnx.transforms.grad import value_and_grad as value_and_grad
from spmdnnx.transforms.jit import JitWrapped as JitWrapped
from spmdnnx.transforms.jit import jit as jit
from spmdnnx.transforms.axes import Carry as Carry
from spmdnnx.transforms.axes import PARTITION_NAME as PARTITION_NAME
from spmdnnx.transforms.axes import StateAxes as StateAxes
from spmdnnx.transforms.rngs import split_rngs as split_rngs
from spmdnnx.transforms.vmap import vmap as vmap
from spmdnnx.transforms.control import cond as cond
from spmdnnx.transforms.control import fori_loop as fori_loop
from spmdnnx.transforms.control import switch as switch
from spmdnnx.transforms.control import while_loop as while_loop
from spmdnnx.transforms.misc import StateSharding as StateSharding
from spmdnnx.transforms.misc import checkpoint_name as checkpoint_name
from spmdnnx.transforms.misc import eval_shape as eval_shape
from spmdnnx.transforms.misc import remat as remat
from spmdnnx.transforms.misc import resolve_policy as resolve_policy
from spmdnnx.transforms.misc import shard_map as shard_map
from spmdnnx.transforms.scan import scan as scan
