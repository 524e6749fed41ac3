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
