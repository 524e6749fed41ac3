"""SPMD core: axis rules, mesh planning, shardings of Module state."""

from spmdnnx.spmd.batch import global_batch_from_local as global_batch_from_local
from spmdnnx.spmd.batch import shard_batch as shard_batch
from spmdnnx.spmd.constrain import constrain as constrain
from spmdnnx.spmd.context import ShardingContext as ShardingContext
from spmdnnx.spmd.context import current_context as current_context
from spmdnnx.spmd.context import use_sharding as use_sharding
from spmdnnx.spmd.init import InitPlan as InitPlan
from spmdnnx.spmd.init import plan_init as plan_init
from spmdnnx.spmd.init import sharded_init as sharded_init
from spmdnnx.spmd.mesh import AXES as AXES
from spmdnnx.spmd.mesh import MeshConfig as MeshConfig
from spmdnnx.spmd.mesh import make_mesh as make_mesh
from spmdnnx.spmd.mesh import plan_abstract as plan_abstract
from spmdnnx.spmd.partition import get_named_sharding as get_named_sharding
from spmdnnx.spmd.partition import get_partition_spec as get_partition_spec
from spmdnnx.spmd.report import ShardingReport as ShardingReport
from spmdnnx.spmd.report import sharding_report as sharding_report
from spmdnnx.spmd.resolve import leaf_shardings as leaf_shardings
from spmdnnx.spmd.resolve import leaf_specs as leaf_specs
from spmdnnx.spmd.rules import AxisRules as AxisRules
from spmdnnx.spmd.rules import LOGICAL_AXES as LOGICAL_AXES
from spmdnnx.spmd.rules import Resolution as Resolution
