"""spmdnnx: a sharded distributed-training runtime for JAX.

``import spmdnnx as nnx`` gives a Flax-NNX-compatible object model whose
Variables carry logical axis names for SPMD sharding.
"""

import importlib

# Subpackages and errors
from spmdnnx import errors as errors
from spmdnnx import spmd as spmd

# Variables and metadata
from spmdnnx._variables import BatchStat as BatchStat
from spmdnnx._variables import Cache as Cache
from spmdnnx._variables import Intermediate as Intermediate
from spmdnnx._variables import OptArrayState as OptArrayState
from spmdnnx._variables import OptState as OptState
from spmdnnx._variables import OptVariable as OptVariable
from spmdnnx._variables import Param as Param
from spmdnnx._variables import Perturbation as Perturbation
from spmdnnx._variables import RngCount as RngCount
from spmdnnx._variables import RngKey as RngKey
from spmdnnx._variables import RngState as RngState
from spmdnnx._variables import Variable as Variable
from spmdnnx._variables import Variable as VariableState  # older Flax name
from spmdnnx._variables import with_metadata as with_metadata
from spmdnnx._variables import with_partitioning as with_partitioning

# Filters
from spmdnnx._filters import All as All
from spmdnnx._filters import Any as Any
from spmdnnx._filters import Everything as Everything
from spmdnnx._filters import Not as Not
from spmdnnx._filters import Nothing as Nothing
from spmdnnx._filters import OfType as OfType
from spmdnnx._filters import PathContains as PathContains
from spmdnnx._filters import WithTag as WithTag

# Objects, State, Rngs
from spmdnnx._object import Dict as Dict
from spmdnnx._object import List as List
from spmdnnx._object import Object as Object
from spmdnnx._object import Object as Pytree
from spmdnnx._rngs import Rngs as Rngs
from spmdnnx._rngs import RngStream as RngStream
from spmdnnx._state import FlatState as FlatState
from spmdnnx._state import State as State

# Graph functions and Module
from spmdnnx._display import display as display
from spmdnnx._graph import clone as clone
from spmdnnx._graph import graphdef as graphdef
from spmdnnx._graph import GraphDef as GraphDef
from spmdnnx._graph import is_graph_node as is_graph_node
from spmdnnx._graph import iter_children as iter_children
from spmdnnx._graph import iter_graph as iter_graph
from spmdnnx._graph import merge as merge
from spmdnnx._graph import pop as pop
from spmdnnx._graph import split as split
from spmdnnx._graph import state as state
from spmdnnx._graph import update as update
from spmdnnx._graph import variables as variables
from spmdnnx._module import Module as Module
from spmdnnx._module import reseed as reseed

# Lifted transforms
from spmdnnx._transforms import Carry as Carry
from spmdnnx._transforms import checkpoint_name as checkpoint_name
from spmdnnx._transforms import cond as cond
from spmdnnx._transforms import DiffState as DiffState
from spmdnnx._transforms import eval_shape as eval_shape
from spmdnnx._transforms import fori_loop as fori_loop
from spmdnnx._transforms import get_max_in_flight as get_max_in_flight
from spmdnnx._transforms import grad as grad
from spmdnnx._transforms import jit as jit
from spmdnnx._stacked import PARTITION_NAME as PARTITION_NAME
from spmdnnx._transforms import remat as remat
from spmdnnx._transforms import resolve_policy as resolve_policy
from spmdnnx._transforms import scan as scan
from spmdnnx._transforms import set_max_in_flight as set_max_in_flight
from spmdnnx._transforms import shard_map as shard_map
from spmdnnx._transforms import split_rngs as split_rngs
from spmdnnx._transforms import StateAxes as StateAxes
from spmdnnx._transforms import StateSharding as StateSharding
from spmdnnx._transforms import switch as switch
from spmdnnx._transforms import value_and_grad as value_and_grad
from spmdnnx._transforms import vmap as vmap
from spmdnnx._transforms import while_loop as while_loop

# SPMD: rules, mesh, sharded state
from spmdnnx.spmd import AxisRules as AxisRules
from spmdnnx.spmd import constrain as constrain
from spmdnnx.spmd import current_context as current_context
from spmdnnx.spmd import get_named_sharding as get_named_sharding
from spmdnnx.spmd import get_partition_spec as get_partition_spec
from spmdnnx.spmd import global_batch_from_local as global_batch_from_local
from spmdnnx.spmd import make_mesh as make_mesh
from spmdnnx.spmd import MeshConfig as MeshConfig
from spmdnnx.spmd import plan_abstract as plan_abstract
from spmdnnx.spmd import shard_batch as shard_batch
from spmdnnx.spmd import sharded_init as sharded_init
from spmdnnx.spmd import sharding_report as sharding_report
from spmdnnx.spmd import use_sharding as use_sharding

# Layers
from spmdnnx.nn import activations as activations
from spmdnnx.nn import avg_pool as avg_pool
from spmdnnx.nn import BatchNorm as BatchNorm
from spmdnnx.nn import celu as celu
from spmdnnx.nn import combine_masks as combine_masks
from spmdnnx.nn import Conv as Conv
from spmdnnx.nn import ConvTranspose as ConvTranspose
from spmdnnx.nn import dot_product_attention as dot_product_attention
from spmdnnx.nn import dot_product_attention_weights as dot_product_attention_weights
from spmdnnx.nn import Dropout as Dropout
from spmdnnx.nn import Einsum as Einsum
from spmdnnx.nn import elu as elu
from spmdnnx.nn import Embed as Embed
from spmdnnx.nn import gelu as gelu
from spmdnnx.nn import glu as glu
from spmdnnx.nn import GroupNorm as GroupNorm
from spmdnnx.nn import GRUCell as GRUCell
from spmdnnx.nn import hard_sigmoid as hard_sigmoid
from spmdnnx.nn import hard_silu as hard_silu
from spmdnnx.nn import hard_swish as hard_swish
from spmdnnx.nn import hard_tanh as hard_tanh
from spmdnnx.nn import identity as identity
from spmdnnx.nn import initializers as initializers
from spmdnnx.nn import LayerNorm as LayerNorm
from spmdnnx.nn import leaky_relu as leaky_relu
from spmdnnx.nn import Linear as Linear
from spmdnnx.nn import LinearGeneral as LinearGeneral
from spmdnnx.nn import log_sigmoid as log_sigmoid
from spmdnnx.nn import log_softmax as log_softmax
from spmdnnx.nn import logsumexp as logsumexp
from spmdnnx.nn import LSTMCell as LSTMCell
from spmdnnx.nn import make_attention_mask as make_attention_mask
from spmdnnx.nn import make_causal_mask as make_causal_mask
from spmdnnx.nn import max_pool as max_pool
from spmdnnx.nn import min_pool as min_pool
from spmdnnx.nn import mish as mish
from spmdnnx.nn import MultiHeadAttention as MultiHeadAttention
from spmdnnx.nn import one_hot as one_hot
from spmdnnx.nn import pool as pool
from spmdnnx.nn import PReLU as PReLU
from spmdnnx.nn import relu as relu
from spmdnnx.nn import relu6 as relu6
from spmdnnx.nn import RMSNorm as RMSNorm
from spmdnnx.nn import selu as selu
from spmdnnx.nn import Sequential as Sequential
from spmdnnx.nn import sigmoid as sigmoid
from spmdnnx.nn import silu as silu
from spmdnnx.nn import soft_sign as soft_sign
from spmdnnx.nn import softmax as softmax
from spmdnnx.nn import softplus as softplus
from spmdnnx.nn import standardize as standardize
from spmdnnx.nn import swish as swish
from spmdnnx.nn import tanh as tanh

# Training: optimizer, stacks
from spmdnnx._optim import Optimizer as Optimizer
from spmdnnx._stack import Stack as Stack
from spmdnnx._stack_convert import stack_states as stack_states
from spmdnnx._stack_convert import unstack_state as unstack_state

# Models
from spmdnnx import models as models

# Flax NNX parity (modes): names added by that part; keep each block separate
from spmdnnx._modes import set_graph_mode as set_graph_mode
from spmdnnx._modes import set_graph_updates as set_graph_updates
# (end of modes block)

# Flax NNX parity (graph): names added by that part; keep each block separate
from spmdnnx._pytree import data as data
from spmdnnx._pytree import Data as Data
from spmdnnx._pytree import dataclass as dataclass
from spmdnnx._pytree import static as static
from spmdnnx._pytree import Static as Static
from spmdnnx._state import GraphState as GraphState
from spmdnnx._graph_api import as_pure as as_pure
from spmdnnx._graph_api import call as call
from spmdnnx._graph_api import find_duplicates as find_duplicates
from spmdnnx._graph_api import map as map  # noqa: A004 (Flax's name)
from spmdnnx._graph_api import PureState as PureState
from spmdnnx._graph_api import recursive_map as recursive_map
from spmdnnx._graph_api import set_metadata as set_metadata
from spmdnnx._graph_api import to_flat_state as to_flat_state
from spmdnnx._graph_api import to_pure_dict as to_pure_dict
from spmdnnx._graph_api import unpack as unpack
from spmdnnx._graph_api import filter_state as filter_state
from spmdnnx._graph_api import from_flat_state as from_flat_state
from spmdnnx._graph_api import map_state as map_state
from spmdnnx._graph_api import merge_state as merge_state
from spmdnnx._graph_api import replace_by_pure_dict as replace_by_pure_dict
from spmdnnx._graph_api import split_state as split_state
from spmdnnx._module import iter_modules as iter_modules
from spmdnnx._module import capture as capture
from spmdnnx._module import view as view
from spmdnnx._module import view_info as view_info
from spmdnnx._module import with_attributes as with_attributes
from spmdnnx import _compat as compat
from spmdnnx._graph_context import current_update_context as current_update_context
from spmdnnx._graph_context import merge_context as merge_context
from spmdnnx._graph_context import MergeContext as MergeContext
from spmdnnx._graph_context import split_context as split_context
from spmdnnx._graph_context import SplitContext as SplitContext
from spmdnnx._graph_context import update_context as update_context
from spmdnnx._graph_context import UpdateContext as UpdateContext
# (end of graph block)

# Flax NNX parity (transforms): names added by that part; keep each block separate
from spmdnnx._transforms import cached_partial as cached_partial
from spmdnnx._transforms import checkify as checkify
from spmdnnx._transforms import custom_vjp as custom_vjp
from spmdnnx._transforms import jvp as jvp
from spmdnnx._transforms import make_jaxpr as make_jaxpr
from spmdnnx._transforms import pmap as pmap
from spmdnnx._transforms import vjp as vjp
from spmdnnx._transforms import jit_partial as jit_partial
from spmdnnx._transforms import prefix as prefix
# (end of transforms block)

# Flax NNX parity (loops): names added by that part; keep each block separate
from spmdnnx._transforms import transform_metadata as transform_metadata
# (end of loops block)

# Flax NNX parity (rngs-variables): names added by that part; keep each block separate
from spmdnnx._variables import A as A
from spmdnnx._variables import var_defaults as var_defaults
from spmdnnx.nn.initializers import Initializer as Initializer
from spmdnnx._transforms.rngs import fork_rngs as fork_rngs
from spmdnnx._transforms.rngs import restore_rngs as restore_rngs
from spmdnnx._transforms.rngs import SplitBackups as SplitBackups
from spmdnnx._transforms.rngs import with_rngs as with_rngs
# (end of rngs-variables block)

# Flax NNX parity (nn-layers): names added by that part; keep each block separate
from spmdnnx.nn import LoRA as LoRA
from spmdnnx.nn import LoRALinear as LoRALinear
from spmdnnx.nn import LoRAParam as LoRAParam
# (end of nn-layers block)

# Flax NNX parity (nn-norm-recurrent): names added by that part; keep each block separate
from spmdnnx.nn import InstanceNorm as InstanceNorm
from spmdnnx.nn import SpectralNorm as SpectralNorm
from spmdnnx.nn import WeightNorm as WeightNorm
from spmdnnx.nn import Bidirectional as Bidirectional
from spmdnnx.nn import OptimizedLSTMCell as OptimizedLSTMCell
from spmdnnx.nn import RNN as RNN
from spmdnnx.nn import RNNCellBase as RNNCellBase
from spmdnnx.nn import SimpleCell as SimpleCell
# (end of nn-norm-recurrent block)

# Flax NNX parity (training-helpers): names added by that part; keep each block separate
from spmdnnx import metrics as metrics
from spmdnnx._optim import ModelAndOptimizer as ModelAndOptimizer
from spmdnnx._train_state import TrainState as TrainState
from spmdnnx._tabulate import tabulate as tabulate
# (end of training-helpers block)

# Flax NNX parity (sharding): names added by that part; keep each block separate
from spmdnnx._abstract import abstract_with_sharding as abstract_with_sharding
from spmdnnx._abstract import as_abstract as as_abstract
from spmdnnx._abstract import get_abstract_model as get_abstract_model
from spmdnnx._eager import logical_axis_rules as logical_axis_rules
from spmdnnx._eager import use_eager_sharding as use_eager_sharding
from spmdnnx._eager import using_eager_sharding as using_eager_sharding
# (end of sharding block)

# Flax NNX parity (pipeline): names added by that part; keep each block separate
from spmdnnx._pipeline import PipelineConfig as PipelineConfig
from spmdnnx._pipeline import bubble_fraction as bubble_fraction
from spmdnnx._pipeline import stage_layers as stage_layers
# (end of pipeline block)

# Flax NNX parity (pvjp): names added by that part; keep each block separate
# (end of pvjp block)

# Flax NNX parity (pvmap): names added by that part; keep each block separate
from spmdnnx import extract as extract
# (end of pvmap block)

# Flax NNX parity (pscan): names added by that part; keep each block separate
# (end of pscan block)

# Flax NNX parity (pgrad): names added by that part; keep each block separate
# (end of pgrad block)

# Flax NNX parity (pshmap): names added by that part; keep each block separate
# (end of pshmap block)

# Flax NNX parity (pgraph): names added by that part; keep each block separate
from spmdnnx._graph_context import from_tree as from_tree
from spmdnnx._graph_context import NodeStates as NodeStates
from spmdnnx._graph_context import to_tree as to_tree
from spmdnnx._graph_api import with_vars as with_vars
# (end of pgraph block)

# Flax NNX parity (pshard): names added by that part; keep each block separate
from spmdnnx._variables import VariableMetadata as VariableMetadata
# (end of pshard block)

# `checkpointing` (orbax) and `train` (grain, tensorboardX, orbax) are imported
# on first use, so the core API does not pay ~0.3 s of import time for them.
_LAZY_NAMESPACES = ("checkpointing", "train")


def __getattr__(name: str):
  if name in _LAZY_NAMESPACES:
    return importlib.import_module(f"spmdnnx.{name}")
  raise AttributeError(f"module 'spmdnnx' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY_NAMESPACES))
