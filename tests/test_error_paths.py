"""Error paths that no other test reached: each raise gets a message-matching test.

Found by listing every ``raise errors.X(...)`` in spmdnnx/ and looking for a
test whose ``match=`` names part of its message (issue 9). Error paths of the
layers, the optimizer and the filters are tested in their own test files.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, PartitionSpec as P

import spmdnnx as nnx
from spmdnnx import errors, nn
from spmdnnx.spmd import AxisRules, MeshConfig, get_partition_spec, make_mesh


# --- graph --------------------------------------------------------------------
def test_merge_rejects_a_corrupt_graphdef():
  bad = nnx.GraphDef(("no-such-tag", 1))
  with pytest.raises(errors.GraphError, match="Corrupt GraphDef spec at <root>"):
    nnx.merge(bad, nnx.State({}))


# --- stacks -------------------------------------------------------------------
def test_unstack_state_names_leaves_without_the_stacked_axis():
  with pytest.raises(errors.ConfigError,
                     match=r"not stacked along 'layers': w is a scalar"):
    nnx.unstack_state({"w": jnp.ones(()), "b": jnp.ones((2, 3))})


# --- transforms ---------------------------------------------------------------
def test_shard_map_in_specs_count_must_match_the_arguments():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  f = nnx.shard_map(lambda x: x, mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"))
  with pytest.raises(errors.TransformError, match="in_specs has 2 entries for 1 arguments"):
    f(jnp.ones((8, 2)))


def test_vmap_in_axes_beyond_the_rank_of_an_argument():
  with pytest.raises(errors.TransformError,
                     match=r"argument leaf 0 \(shape \(3,\)\) along axis 1, which it lacks"):
    nnx.vmap(lambda x: x, in_axes=1)(jnp.ones(3))


# --- attention ----------------------------------------------------------------
def test_dot_product_attention_shape_mismatch_names_all_shapes():
  q = jnp.ones((1, 2, 2, 4))
  k = jnp.ones((1, 3, 2, 8))
  with pytest.raises(errors.ShapeError,
                     match=r"query and key depths must match.*got shapes "
                     r"\[\(1, 2, 2, 4\), \(1, 3, 2, 8\), \(1, 3, 2, 8\)\]"):
    nn.dot_product_attention(q, k, k)


def test_dot_product_attention_dropout_needs_a_key():
  q = jnp.ones((1, 2, 2, 4))
  with pytest.raises(errors.ConfigError, match="no dropout_rng was given"):
    nn.dot_product_attention(q, q, q, dropout_rate=0.5, deterministic=False)


def test_attention_inputs_v_without_inputs_k():
  mha = nn.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=4,
                              decode=False, rngs=nnx.Rngs(0))
  x = jnp.ones((1, 3, 4))
  with pytest.raises(errors.ConfigError, match="inputs_v given without inputs_k"):
    mha(x, inputs_v=x, deterministic=True)


# --- linear -------------------------------------------------------------------
def test_linear_general_axis_count_must_match_in_features():
  with pytest.raises(errors.ConfigError,
                     match=r"axis \(-1,\) names 1 input axes but in_features \(2, 3\) has 2"):
    nn.LinearGeneral((2, 3), 4, axis=-1, rngs=nnx.Rngs(0))


# --- mesh planning ------------------------------------------------------------
def test_mesh_config_unknown_axis_lists_the_valid_ones():
  with pytest.raises(errors.MeshError,
                     match=r"unknown parallelism axis 'model'; valid axes are data, stage"):
    MeshConfig(model=2)


def test_mesh_config_ici_and_keyword_degrees_are_exclusive():
  with pytest.raises(errors.MeshError, match=r"give either ici=\{...\} or degrees .*tensor"):
    MeshConfig(ici={"fsdp": 2}, tensor=2)


def test_make_mesh_rejects_unknown_axis_types_name():
  with pytest.raises(errors.MeshError, match="Unknown axis_types 'manual'"):
    make_mesh(MeshConfig(fsdp=-1), axis_types="manual")


def test_make_mesh_axis_types_need_one_per_axis():
  with pytest.raises(errors.MeshError, match="axis_types must be 'auto', 'explicit', one "
                     "AxisType or 6 of them"):
    make_mesh(MeshConfig(fsdp=-1), axis_types=(AxisType.Auto,))


# --- axis rules ---------------------------------------------------------------
def test_axis_rules_reject_a_non_list():
  with pytest.raises(errors.AxisRulesError,
                     match=r"Expected a list of \(logical_name, mesh_axes\) pairs, got int"):
    AxisRules(42)


def test_rules_validate_rejects_a_non_mesh():
  with pytest.raises(errors.MeshError, match="Expected a jax.sharding.Mesh, AbstractMesh or "
                     "a dict of axis sizes, got int"):
    AxisRules([("embed", "fsdp")]).validate(42)


def test_mesh_sizes_must_be_positive_ints_and_all_bad_ones_are_listed():
  layer = nn.Linear(2, 4, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
  rules = AxisRules([("embed", "fsdp"), ("mlp", "tensor")])
  with pytest.raises(errors.MeshError,
                     match=r"positive ints; bad entries: 'fsdp'=0, 'tensor'=-2"):
    get_partition_spec(layer, mesh={"fsdp": 0, "tensor": -2}, rules=rules)
