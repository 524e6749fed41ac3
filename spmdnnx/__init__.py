"""spmdnnx: a sharded distributed-training runtime for JAX.

``import spmdnnx as nnx`` gives a Flax-NNX-compatible object model whose
Variables carry logical axis names for SPMD sharding.
"""

from spmdnnx import errors as errors
from spmdnnx.filters import All as All
from spmdnnx.filters import Any as Any
from spmdnnx.filters import Everything as Everything
from spmdnnx.filters import Not as Not
from spmdnnx.filters import Nothing as Nothing
from spmdnnx.filters import OfType as OfType
from spmdnnx.filters import PathContains as PathContains
from spmdnnx.filters import WithTag as WithTag
from spmdnnx.graph import GraphDef as GraphDef
from spmdnnx.graph import clone as clone
from spmdnnx.graph import graphdef as graphdef
from spmdnnx.graph import is_graph_node as is_graph_node
from spmdnnx.graph import iter_children as iter_children
from spmdnnx.graph import iter_graph as iter_graph
from spmdnnx.graph import merge as merge
from spmdnnx.graph import pop as pop
from spmdnnx.graph import split as split
from spmdnnx.graph import state as state
from spmdnnx.graph import update as update
from spmdnnx.display import display as display
from spmdnnx.module import Module as Module
from spmdnnx.module import reseed as reseed
from spmdnnx.object import Dict as Dict
from spmdnnx.object import List as List
from spmdnnx.object import Object as Object
from spmdnnx.object import Object as Pytree
from spmdnnx.rngs import RngStream as RngStream
from spmdnnx.rngs import Rngs as Rngs
from spmdnnx.state import FlatState as FlatState
from spmdnnx.state import State as State
from spmdnnx.variables import BatchStat as BatchStat
from spmdnnx.variables import Cache as Cache
from spmdnnx.variables import Intermediate as Intermediate
from spmdnnx.variables import OptState as OptState
from spmdnnx.variables import Param as Param
from spmdnnx.variables import Perturbation as Perturbation
from spmdnnx.variables import RngCount as RngCount
from spmdnnx.variables import RngKey as RngKey
from spmdnnx.variables import RngState as RngState
from spmdnnx.variables import Variable as Variable
from spmdnnx.variables import with_metadata as with_metadata
from spmdnnx.variables import with_partitioning as with_partitioning
from spmdnnx.transforms import DiffState as DiffState
from spmdnnx.transforms import grad as grad
from spmdnnx.transforms import jit as jit
from spmdnnx.transforms import value_and_grad as value_and_grad
from spmdnnx.transforms import Carry as Carry
from spmdnnx.transforms import PARTITION_NAME as PARTITION_NAME
from spmdnnx.transforms import StateAxes as StateAxes
from spmdnnx.transforms import StateSharding as StateSharding
from spmdnnx.transforms import checkpoint_name as checkpoint_name
from spmdnnx.transforms import cond as cond
from spmdnnx.transforms import eval_shape as eval_shape
from spmdnnx.transforms import fori_loop as fori_loop
from spmdnnx.transforms import remat as remat
from spmdnnx.transforms import scan as scan
from spmdnnx.transforms import shard_map as shard_map
from spmdnnx.transforms import split_rngs as split_rngs
from spmdnnx.transforms import switch as switch
from spmdnnx.transforms import vmap as vmap
from spmdnnx.transforms import while_loop as while_loop
