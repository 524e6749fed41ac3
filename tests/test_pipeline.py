"""Tests for pipeline parallelism: `Stack(pipeline=PipelineConfig(...))` over `stage`."""

import doctest
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx import models
from spmdnnx import spmd
from spmdnnx import _graph as graph
from spmdnnx import _pipeline as pipeline_lib
from spmdnnx._optim import Optimizer
from spmdnnx._pipeline import PipelineConfig
from spmdnnx._stack import Stack
from spmdnnx.checkpointing import CheckpointManager
from spmdnnx.nn import Dropout, Linear

D = 8


def mesh_of(**degrees):
  return spmd.make_mesh(spmd.MeshConfig(**degrees))


def stage_rules(preset="fsdp_tp"):
  return spmd.AxisRules.load(preset).override(layers="stage")


class Block(nnx.Module):
  """A small residual block with a per-example keyword argument."""

  def __init__(self, rngs):
    self.lin = Linear(D, D, kernel_axes=("embed", "mlp"), rngs=rngs)

  def __call__(self, x, scale=None, shift=0.0):
    y = jnp.tanh(self.lin(x)) + shift
    return x + (y if scale is None else y * scale)


def tiny_lm(pipeline_microbatches=0, pipeline_repeats=1, **changes):
  base = dict(vocab_size=48, embed_dim=16, num_layers=8, num_heads=4, num_kv_heads=2,
              head_dim=8, mlp_dim=32, max_seq_len=16,
              pipeline_microbatches=pipeline_microbatches, pipeline_repeats=pipeline_repeats)
  base.update(changes)
  return models.DecoderLM(models.LMConfig(**base), rngs=nnx.Rngs(0))


def lm_loss_fn(model, tokens):
  logits = model(tokens[:, :-1])
  return models.lm_loss(logits, tokens[:, 1:], z_loss=1e-4)[0]


def tokens(batch=16, length=9):
  return jax.random.randint(jax.random.key(1), (batch, length), 0, 32, dtype=jnp.int32)


def assert_trees_close(a, b, rtol=1e-5):
  """Leaves equal up to ``rtol`` of each reference leaf's largest magnitude."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    y = np.asarray(y)
    scale = float(np.abs(y).max()) if y.size else 0.0
    np.testing.assert_allclose(np.asarray(x), y, rtol=0, atol=rtol * scale)


# --- the schedule arithmetic -------------------------------------------------------


def test_stage_layers_contiguous_and_circular():
  assert pipeline_lib.stage_layers(8, 4) == ((0, 1), (2, 3), (4, 5), (6, 7))
  assert pipeline_lib.stage_layers(8, 2, repeats=2) == ((0, 1, 4, 5), (2, 3, 6, 7))
  assert pipeline_lib.stage_layers(8, 4, repeats=2) == ((0, 4), (1, 5), (2, 6), (3, 7))


def test_bubble_fraction():
  assert pipeline_lib.bubble_fraction(4, 8) == pytest.approx(3 / 11)
  assert pipeline_lib.bubble_fraction(4, 8, repeats=2) == pytest.approx(3 / 19)
  assert pipeline_lib.bubble_fraction(1, 3) == 0.0


def test_circular_relayout_moves_every_chunk_once():
  """The (round, slot) permutations cover every (stage, round) target exactly once."""
  for stages, repeats in ((4, 2), (4, 3), (2, 4), (3, 2)):
    seen = {}
    for r, j, pairs in pipeline_lib._circular_moves(stages, repeats):
      for d, s in pairs:
        assert (s, r) not in seen
        seen[(s, r)] = d * repeats + j
    assert seen == {(s, r): r * stages + s for s in range(stages) for r in range(repeats)}


# --- equivalence with the plain scan -------------------------------------------------


def run_stack(stack, x, scale, mesh, rules):
  def loss(stack, x, scale):
    return jnp.sum(stack(x, scale=scale, shift=0.5) ** 2)

  with spmd.use_sharding(mesh, rules):
    f = nnx.jit(lambda s, x, sc: nnx.value_and_grad(loss)(s, x, sc), donate_state=False)
    return f(stack, x, scale)


@pytest.mark.parametrize("degrees,repeats,remat", [
    (dict(stage=4, fsdp=2), 1, None),
    (dict(stage=4, fsdp=2), 2, "full"),
    (dict(stage=2, tensor=2, data=2), 2, None),
])
def test_stack_pipeline_matches_scan(degrees, repeats, remat):
  mesh, rules = mesh_of(**degrees), stage_rules()
  x = jax.random.normal(jax.random.key(1), (16, D))
  scale = jax.random.uniform(jax.random.key(2), (16, 1))
  cfg = PipelineConfig(microbatches=8, repeats=repeats, batch_kwargs=("scale",))
  plain = Stack(Block, 8, rngs=nnx.Rngs(0))
  piped = Stack(Block, 8, rngs=nnx.Rngs(0), pipeline=cfg, remat=remat)
  l0, g0 = run_stack(plain, x, scale, mesh, rules)
  l1, g1 = run_stack(piped, x, scale, mesh, rules)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  assert_trees_close(g1, g0)
  # a wrong microbatch split of `scale` would change the loss
  _, g_bad = run_stack(piped, x, jnp.roll(scale, 1, axis=0), mesh, rules)
  assert not np.allclose(g_bad.block.lin.kernel.value, g0.block.lin.kernel.value)


def test_pipeline_without_stage_axis_scans():
  """Outside use_sharding, or with stage=1, a pipelined Stack is an ordinary scan."""
  x = jax.random.normal(jax.random.key(1), (6, D))
  cfg = PipelineConfig(microbatches=4)     # 6 rows would not split into 4 microbatches
  plain = Stack(Block, 4, rngs=nnx.Rngs(0))
  piped = Stack(Block, 4, rngs=nnx.Rngs(0), pipeline=cfg)
  np.testing.assert_allclose(piped(x), plain(x))
  with spmd.use_sharding(mesh_of(fsdp=8), stage_rules()):
    np.testing.assert_allclose(nnx.jit(lambda s, x: s(x))(piped, x), plain(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("repeats", [1, 2])
def test_lm_pipeline_matches_plain_loss_and_grads(repeats):
  mesh, rules = mesh_of(stage=4, fsdp=2), stage_rules()
  plain, piped = tiny_lm(), tiny_lm(8, repeats)
  assert_trees_close(graph.state(piped), graph.state(plain), rtol=0)
  toks = tokens()
  out = []
  for model in (plain, piped):
    with spmd.use_sharding(mesh, rules):
      f = nnx.jit(lambda m, t: nnx.value_and_grad(lm_loss_fn)(m, t), donate_state=False)
      out.append(f(model, toks))
  np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-5)
  assert_trees_close(out[1][1], out[0][1])


def test_lm_pipeline_optimizer_step_matches_plain():
  mesh, rules = mesh_of(stage=4, fsdp=2), stage_rules()
  toks = tokens()
  after = []
  for model in (tiny_lm(), tiny_lm(4)):
    with spmd.use_sharding(mesh, rules):
      opt = Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

      @nnx.jit
      def step(model, opt, t):
        loss, grads = nnx.value_and_grad(lm_loss_fn)(model, t)
        opt.update(model, grads)
        return loss

      for _ in range(2):
        step(model, opt, toks)
      after.append(graph.state(model, nnx.Param))
      assert model.layers.block.mlp_norm.scale.value.sharding.spec[0] == "stage"
  assert_trees_close(after[1], after[0])


# --- placement and the compiled program ----------------------------------------------


def test_stacked_params_per_device_bytes():
  mesh, rules = mesh_of(stage=4, fsdp=2), stage_rules()
  model = tiny_lm(8)
  with spmd.use_sharding(mesh, rules):
    nnx.jit(lambda m, t: lm_loss_fn(m, t))(model, tokens())
  total = per_device = 0
  for path, v in graph.state(model.layers, nnx.Param).flat_state():
    arr = v.value
    spec = arr.sharding.spec
    assert spec[0] == "stage", path
    ways = 4 * (2 if "fsdp" in jax.tree.leaves(tuple(spec)) else 1)
    shard = arr.addressable_shards[0].data.nbytes
    assert shard * ways == arr.nbytes, (path, spec)
    total += arr.nbytes
    per_device += shard
  assert per_device * 4 <= total <= per_device * 8


def _device_groups(line, mesh):
  """The device groups of a collective's replica_groups, as logical device ids."""
  n = mesh.devices.size
  m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
  if m:
    return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}",
                                                                     m.group(1))]
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    ids = np.arange(n).reshape([int(d) for d in m.group(3).split(",")])
    if m.group(4):
      ids = ids.transpose([int(p) for p in m.group(4).split(",")])
    return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
                r"(?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}", line)
  if m:
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    over = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
    ids = np.arange(n)
    if m.group(2):
      ids = ids.reshape([int(d) for d in m.group(2).split(",")])
      if m.group(3):
        ids = ids.transpose([int(p) for p in m.group(3).split(",")])
    ids = ids.reshape(sizes)
    rest = [i for i in range(len(sizes)) if i not in over]
    return ids.transpose(rest + over).reshape(-1, int(np.prod([sizes[i] for i in over])
                                                      )).tolist()
  raise AssertionError(f"unknown replica_groups format: {line[:300]}")


def _stage_of(mesh):
  axis = mesh.axis_names.index("stage")
  return lambda i: np.unravel_index(i, mesh.devices.shape)[axis]


def collectives(hlo, op):
  return [l for l in hlo.splitlines() if re.search(rf"= \S+ {op}(-start)?\(", l)]


def _is_layer_weight(shape, layer_shapes, num_layers):
  """Whether an all-gather result looks like stacked weights (some layers, maybe halved)."""
  for cand in (shape, shape[1:]) if shape and shape[0] <= num_layers else (shape,):
    for s in layer_shapes:
      if len(cand) == len(s) and all(c in (d, d // 2) for c, d in zip(cand, s)):
        return True
  return False


def cross_stage_layer_gathers(hlo, mesh, model):
  """All-gathers of stacked-layer weights whose device groups span several stages."""
  stage = _stage_of(mesh)
  layer_shapes = {tuple(v.shape[1:]) for v in jax.tree.leaves(graph.state(model.layers))}
  out = []
  for l in collectives(hlo, "all-gather"):
    shape = tuple(int(d) for d in re.search(r"= \w+\[([\d,]*)\]", l).group(1).split(",") if d)
    if _is_layer_weight(shape, layer_shapes, model.layers.num_layers) and any(
        len({stage(i) for i in g}) > 1 for g in _device_groups(l, mesh)):
      out.append(l)
  return out


def lm_step_hlo(model, mesh, rules):
  with spmd.use_sharding(mesh, rules):
    f = nnx.jit(lambda m, t: nnx.value_and_grad(lm_loss_fn)(m, t))
    return f.lower(model, tokens()).compile().as_text()


@pytest.mark.parametrize("repeats", [1, 2])
def test_compiled_step_permutes_activations_and_never_gathers_layers(repeats):
  mesh, rules = mesh_of(stage=4, fsdp=2), stage_rules()
  model = tiny_lm(8, repeats)
  hlo = lm_step_hlo(model, mesh, rules)
  stage = _stage_of(mesh)
  permutes = collectives(hlo, "collective-permute")
  crossing = [l for l in permutes
              if any(stage(int(a)) != stage(int(b))
                     for a, b in re.findall(r"\{(\d+),(\d+)\}", l.split("source_target_pairs=")[1]))]
  assert crossing, "activations should move between stages by collective permutes"
  assert cross_stage_layer_gathers(hlo, mesh, model) == []


def test_plain_scan_on_stage_sharded_layers_does_gather_across_stages():
  """The control for the test above: without the pipeline, layers are gathered."""
  mesh, rules = mesh_of(stage=4, fsdp=2), stage_rules()
  model = tiny_lm()
  hlo = lm_step_hlo(model, mesh, rules)
  assert cross_stage_layer_gathers(hlo, mesh, model)


def test_replica_group_formats():
  mesh = mesh_of(stage=4, fsdp=2)
  assert _device_groups("replica_groups={{0,2},{1,3}}, x", mesh) == [[0, 2], [1, 3]]
  assert _device_groups("replica_groups=[4,2]<=[8], d", mesh)[1] == [2, 3]
  assert _device_groups("replica_groups=[2,4]<=[4,2]T(1,0), d", mesh)[0] == [0, 2, 4, 6]
  line = "replica_groups=mesh['axis_0'=4,'axis_1'=2] {'axis_0'}, d"
  assert _device_groups(line, mesh)[0] == [0, 2, 4, 6]
  line = "replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([4,2]T(1,0)) {'axis_1'}, d"
  assert _device_groups(line, mesh) == [[0, 2, 4, 6], [1, 3, 5, 7]]


# --- state, rngs, checkpoints ----------------------------------------------------------


class Counted(nnx.Variable):
  pass


class DropBlock(nnx.Module):
  """Dropout with per-layer Rngs and a call counter: stateful layers."""

  def __init__(self, rngs):
    self.lin = Linear(D, D, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.drop = Dropout(0.5, rngs=rngs)
    self.calls = Counted(jnp.zeros((), jnp.int32))

  def __call__(self, x):
    self.calls.value = self.calls.value + 1
    return x + self.drop(jnp.tanh(self.lin(x)))


@pytest.mark.parametrize("repeats", [1, 2])
def test_dropout_and_state_match_sequential_microbatches(repeats):
  """Each layer sees the microbatches in order: same masks, same state, no bubble writes."""
  mesh, rules = mesh_of(stage=4, fsdp=2), stage_rules()
  x = jax.random.normal(jax.random.key(3), (8, D))
  m = 4
  piped = Stack(DropBlock, 8, rngs=nnx.Rngs(0, dropout=1),
                pipeline=PipelineConfig(m, repeats=repeats))
  plain = Stack(DropBlock, 8, rngs=nnx.Rngs(0, dropout=1))
  with spmd.use_sharding(mesh, rules):
    y = nnx.jit(lambda s, x: s(x))(piped, x)
  outs = [plain(x[i::m]) for i in range(m)]
  expected = jnp.stack(outs, axis=1).reshape(x.shape)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
  assert_trees_close(graph.state(piped), graph.state(plain), rtol=0)
  np.testing.assert_array_equal(piped.block.calls.value, np.full(8, m))
  assert not np.allclose(outs[0], plain(x[0::m]))   # the masks change from call to call


def test_checkpoint_moves_between_pipelined_and_plain(tmp_path):
  mesh, rules = mesh_of(stage=4, fsdp=2), stage_rules()
  piped = tiny_lm(8)
  with spmd.use_sharding(mesh, rules):
    nnx.jit(lambda m, t: lm_loss_fn(m, t))(piped, tokens())
    for v in graph.variables(piped.layers, nnx.Param).flat_state():
      v[1].value = v[1].value + 1.0
    with CheckpointManager(tmp_path / "a", async_save=False) as mngr:
      mngr.save(1, model=piped)
    plain = tiny_lm(0)
    with CheckpointManager(tmp_path / "a", async_save=False) as mngr:
      mngr.restore(1, model=plain)
  assert_trees_close(graph.state(plain), graph.state(piped), rtol=0)
  back = tiny_lm(8, 2)
  with CheckpointManager(tmp_path / "b", async_save=False) as mngr:
    mngr.save(1, model=plain)
  with CheckpointManager(tmp_path / "b", async_save=False) as mngr:
    mngr.restore(1, model=back)
  assert_trees_close(graph.state(back), graph.state(piped), rtol=0)


# --- errors ------------------------------------------------------------------------------


def call_piped(num_layers=8, microbatches=8, repeats=1, batch=16, degrees=None, **kwargs):
  stack = Stack(Block, num_layers, rngs=nnx.Rngs(0),
                pipeline=PipelineConfig(microbatches, repeats, batch_kwargs=("scale",)))
  x = jnp.ones((batch, D))
  kwargs.setdefault("scale", jnp.ones((batch, 1)))
  with spmd.use_sharding(mesh_of(**(degrees or dict(stage=4, fsdp=2))), stage_rules()):
    return stack(x, **kwargs)


def test_error_layers_not_divisible_by_stages_times_repeats():
  with pytest.raises(errors.ConfigError, match=r"num_layers=6 is not divisible by stages=4 x "
                     r"repeats=1 = 4"):
    call_piped(num_layers=6)
  with pytest.raises(errors.ConfigError, match=r"num_layers=4 is not divisible by stages=4 x "
                     r"repeats=2 = 8"):
    call_piped(num_layers=4, repeats=2)
  with pytest.raises(errors.ConfigError, match="num_layers=6 is not divisible by pipeline "
                     "repeats=4"):
    Stack(Block, 6, rngs=nnx.Rngs(0), pipeline=PipelineConfig(8, repeats=4))


def test_error_batch_not_divisible_by_microbatches():
  with pytest.raises(errors.ShapeError, match=r"batch size 12 is not divisible by "
                     r"microbatches=8"):
    call_piped(batch=12)


def test_error_fewer_microbatches_than_stages():
  with pytest.raises(errors.ConfigError, match=r"microbatches=2 is fewer than stages=4.*"
                     r"microbatches >= 4"):
    call_piped(microbatches=2)


def test_error_batch_kwargs():
  stack = Stack(Block, 8, rngs=nnx.Rngs(0), pipeline=PipelineConfig(8, batch_kwargs=("scale",)))
  with spmd.use_sharding(mesh_of(stage=4, fsdp=2), stage_rules()):
    with pytest.raises(errors.ConfigError, match=r"batch_kwargs \['scale'\] were not passed"):
      stack(jnp.ones((16, D)))
    with pytest.raises(errors.ShapeError, match=r"same leading batch axis.*scale \(8, 1\)"):
      stack(jnp.ones((16, D)), scale=jnp.ones((8, 1)))


def test_error_pipeline_config_values():
  with pytest.raises(errors.ConfigError, match=r"microbatches=0.*integers >= 1"):
    PipelineConfig(0)
  with pytest.raises(errors.ConfigError, match=r"repeats=-1"):
    PipelineConfig(4, repeats=-1)
  with pytest.raises(errors.ConfigError, match=r"batch_kwargs=\(3,\)"):
    PipelineConfig(4, batch_kwargs=(3,))
  with pytest.raises(errors.ConfigError, match="pipeline must be None or an "
                     "nnx.PipelineConfig"):
    Stack(Block, 4, rngs=nnx.Rngs(0), pipeline=4)
  with pytest.raises(errors.ConfigError, match=r"stages=4 x repeats=1 = 4"):
    pipeline_lib.stage_layers(6, 4)


def test_error_graph_objects_as_keywords():
  with pytest.raises(errors.TransformError, match=r"keyword argument\(s\) \['shift'\] hold "
                     "graph objects"):
    call_piped(shift=nnx.Rngs(0))


class PairBlock(Block):

  def __call__(self, x):
    return x, x.sum()


class WritingBlock(Block):

  def __call__(self, x):
    self.lin.bias.value = self.lin.bias.value + 1.0
    return x


class GrowingBlock(Block):

  def __call__(self, x):
    return x[:, :-1]


class SowBlock(Block):

  def __call__(self, x):
    self.sow(nnx.Intermediate, "seen", x)
    return x


@pytest.mark.parametrize("cls,match", [
    (PairBlock, r"must return only the next carry"),
    (SowBlock, r"the block changed its structure while running"),
    (WritingBlock, r"writes its parameters lin/bias"),
    (GrowingBlock, r"changes the carry's shape or dtype"),
])
def test_error_blocks_a_pipeline_cannot_run(cls, match):
  stack = Stack(cls, 4, rngs=nnx.Rngs(0), pipeline=PipelineConfig(4))
  with spmd.use_sharding(mesh_of(stage=4, fsdp=2), stage_rules()):
    with pytest.raises(errors.TransformError, match=match):
      stack(jnp.ones((8, D)))


def test_error_lm_config_pipeline_fields():
  with pytest.raises(errors.ConfigError, match=r"pipeline_repeats \(3\) must divide "
                     r"num_layers \(4\)"):
    models.LMConfig(pipeline_microbatches=4, pipeline_repeats=3)
  with pytest.raises(errors.ConfigError, match=r"pipeline_microbatches must be an int >= 0"):
    models.LMConfig(pipeline_microbatches=-1)
  with pytest.raises(errors.ConfigError, match=r"pipeline_repeats must be a positive int"):
    models.LMConfig(pipeline_repeats=0)
  with pytest.raises(errors.ConfigError, match=r"needs scan_layers=True"):
    models.LMConfig(pipeline_microbatches=4, scan_layers=False)


def test_docstring_examples():
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(pipeline_lib, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
