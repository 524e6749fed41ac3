"""Lifted transforms: JAX transforms that accept graph objects."""

from spmdnnx.transforms.grad import DiffState as DiffState
from spmdnnx.transforms.grad import grad as grad
from spmdnnx.transforms.grad import value_and_grad as value_and_grad
from spmdnnx.transforms.jit import JitWrapped as JitWrapped
from spmdnnx.transforms.jit import jit as jit
