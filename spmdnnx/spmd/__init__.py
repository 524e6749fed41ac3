"""SPMD core: axis rules, mesh planning, shardings of Module state."""

from spmdnnx.spmd._batch import global_batch_from_local as global_batch_from_local
from spmdnnx.spmd._batch import shard_batch as shard_batch
from spmdnnx.spmd._constrain import constrain as constrain
from spmdnnx.spmd._constrain import explicit_out_sharding as explicit_out_sharding
from spmdnnx.spmd._constrain import layout_activation as layout_activation
from spmdnnx.spmd._context import ShardingContext as ShardingContext
from spmdnnx.spmd._context import current_context as current_context
from spmdnnx.spmd._context import use_sharding as use_sharding
from spmdnnx.spmd._init import InitPlan as InitPlan
from spmdnnx.spmd._init import plan_init as plan_init
from spmdnnx.spmd._init import sharded_init as sharded_init
from spmdnnx.spmd._mesh import AXES as AXES
from spmdnnx.spmd._mesh import MeshConfig as MeshConfig
from spmdnnx.spmd._mesh import make_mesh as make_mesh
from spmdnnx.spmd._mesh import plan_abstract as plan_abstract
from spmdnnx.spmd._partition import get_named_sharding as get_named_sharding
from spmdnnx.spmd._partition import get_partition_spec as get_partition_spec
from spmdnnx.spmd._report import ShardingReport as ShardingReport
from spmdnnx.spmd._report import sharding_report as sharding_report
from spmdnnx.spmd._resolve import leaf_shardings as leaf_shardings
from spmdnnx.spmd._resolve import leaf_specs as leaf_specs
from spmdnnx.spmd._rules import AxisRules as AxisRules
from spmdnnx.spmd._rules import LOGICAL_AXES as LOGICAL_AXES
from spmdnnx.spmd._rules import Resolution as Resolution
from spmdnnx._stacked import PARTITION_NAME as PARTITION_NAME
