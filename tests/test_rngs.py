"""Tests for spmdnnx._rngs: streams, counters, fork/split, reseed, jit propagation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


def key_data(k):
  return np.asarray(jax.random.key_data(k))


def same(a, b):
  return np.array_equal(key_data(a), key_data(b))


def test_default_stream():
  rngs = nnx.Rngs(0)
  k1, k2 = rngs(), rngs()
  assert jnp.issubdtype(k1.dtype, jax.dtypes.prng_key) and k1.shape == ()
  assert not same(k1, k2)
  assert int(rngs.default.count.value) == 2
  assert same(k1, jax.random.fold_in(jax.random.key(0), 0))
  assert same(k2, jax.random.fold_in(jax.random.key(0), 1))


def test_named_streams_independent_counters():
  rngs = nnx.Rngs(params=0, dropout=1)
  p1 = rngs.params()
  d1 = rngs.dropout()
  p2 = rngs.params()
  assert int(rngs.params.count.value) == 2 and int(rngs.dropout.count.value) == 1
  assert same(p1, jax.random.fold_in(jax.random.key(0), 0))
  assert same(d1, jax.random.fold_in(jax.random.key(1), 0))
  assert not same(p1, p2) and not same(p1, d1)
  assert rngs["params"] is rngs.params
  assert "params" in rngs and "noise" not in rngs
  assert sorted(rngs) == ["dropout", "params"] and len(rngs) == 2


def test_same_seed_same_keys():
  a, b = nnx.Rngs(params=3), nnx.Rngs(params=3)
  assert same(a.params(), b.params())


def test_missing_stream_falls_back_to_default():
  rngs = nnx.Rngs(0, dropout=1)
  k = rngs.params()
  assert same(k, jax.random.fold_in(jax.random.key(0), 0))
  assert int(rngs.default.count.value) == 1
  assert rngs.params is rngs.default


def test_missing_stream_without_default_error():
  rngs = nnx.Rngs(params=0, dropout=1)
  with pytest.raises(errors.ConfigError,
                     match=r"No RngStream named 'noise' found in Rngs \(and no 'default' stream\); streams are "
                     r"\['dropout', 'params'\]\. Create it, e\.g\. nnx\.Rngs\(noise=0\), or "
                     r"give a default seed: nnx\.Rngs\(0\)"):
    rngs.noise()
  with pytest.raises(errors.ConfigError, match=r"No RngStream named 'default' found in Rngs; .*nnx\.Rngs\(0\)"):
    rngs()  # rngs() draws from the default stream, which is absent
  # Flax programs catch it as AttributeError (rngs.name) or KeyError (rngs["name"])
  with pytest.raises(AttributeError, match="No RngStream named 'noise'"):
    rngs.noise  # noqa: B018
  with pytest.raises(KeyError, match="No RngStream named 'noise'"):
    rngs["noise"]  # noqa: B018


def test_bad_seed_error():
  with pytest.raises(errors.ConfigError,
                     match=r"Rngs stream 'params': seed must be an int, an integer scalar "
                     r"array or a PRNG key, got 'x'"):
    nnx.Rngs(params="x")


def test_seed_forms():
  key = jax.random.key(5)
  assert same(nnx.Rngs(key)(), nnx.Rngs(5)())
  assert same(nnx.Rngs(jnp.array(5))(), nnx.Rngs(5)())
  raw = jax.random.key_data(key)
  assert same(nnx.Rngs(raw)(), nnx.Rngs(5)())
  assert same(nnx.Rngs({"params": 5}).params(), nnx.Rngs(params=5).params())


def test_stream_state_is_variables_with_tags():
  rngs = nnx.Rngs(params=0)
  assert type(rngs.params.key) is nnx.RngKey and rngs.params.key.tag == "params"
  assert type(rngs.params.count) is nnx.RngCount and rngs.params.count.tag == "params"
  assert rngs.params.count.value.dtype == jnp.uint32
  state = nnx.state(rngs, nnx.RngCount)
  assert [p for p, _ in state.flat_state()] == [("params", "count")]
  assert [p for p, _ in nnx.state(rngs, "params").flat_state()] == [
      ("params", "count"), ("params", "key")]


def test_counters_advance_across_nnx_jit():

  class Noisy(nnx.Module):

    def __init__(self, rngs):
      self.rngs = rngs

    def __call__(self):
      return jax.random.normal(self.rngs.noise(), (2,))

  m = Noisy(nnx.Rngs(noise=0))

  @nnx.jit
  def draw(m):
    return m()

  a, b, c = draw(m), draw(m), draw(m)
  assert int(m.rngs.noise.count.value) == 3
  assert not np.allclose(a, b) and not np.allclose(b, c)
  ref = nnx.Rngs(noise=0)
  for got in (a, b, c):
    np.testing.assert_allclose(got, jax.random.normal(ref.noise(), (2,)))


def test_rngs_passed_directly_to_jit():

  @nnx.jit
  def f(rngs):
    return jax.random.uniform(rngs.params())

  rngs = nnx.Rngs(params=1)
  x, y = f(rngs), f(rngs)
  assert float(x) != float(y)
  assert int(rngs.params.count.value) == 2


def test_rngs_through_split_merge():
  rngs = nnx.Rngs(0, dropout=1)
  rngs.dropout()
  g, s = nnx.split(rngs)
  r2 = nnx.merge(g, s, copy=True)  # merge shares the Variables unless copy=True
  assert int(r2.dropout.count.value) == 1
  assert same(r2.dropout(), rngs.dropout())


def test_fork_single():
  rngs = nnx.Rngs(params=0, dropout=1)
  forked = rngs.fork()
  assert int(rngs.params.count.value) == 1 and int(rngs.dropout.count.value) == 1
  assert forked.params.key.value.shape == ()
  assert int(forked.params.count.value) == 0
  assert not same(forked.params(), nnx.Rngs(params=0).params())


@pytest.mark.parametrize("split,shape", [(4, (4,)), ((2, 3), (2, 3))])
def test_fork_split_shapes(split, shape):
  rngs = nnx.Rngs(params=0, dropout=1)
  forked = rngs.fork(split=split)
  for name in ("params", "dropout"):
    assert forked[name].key.value.shape == shape
    assert forked[name].count.value.shape == shape
    assert forked[name].count.value.dtype == jnp.uint32
  keys = key_data(forked.params.key.value).reshape(-1, 2)
  assert len({tuple(k) for k in keys}) == keys.shape[0]  # all distinct


def test_split_shorthand_and_vmap_over_forked_keys():
  rngs = nnx.Rngs(0)
  s = rngs.split(3)
  assert s.default.key.value.shape == (3,)
  samples = jax.vmap(lambda k: jax.random.normal(k, ()))(s.default.key.value)
  assert samples.shape == (3,) and len(set(np.asarray(samples).tolist())) == 3


def test_fork_split_per_stream_mapping():
  rngs = nnx.Rngs(params=0, dropout=1)
  forked = rngs.fork(split={"dropout": 4})
  assert forked.dropout.key.value.shape == (4,)
  assert forked.params.key.value.shape == ()
  forked = rngs.fork(split={nnx.PathContains("params"): 2, ...: 3})
  assert forked.params.key.value.shape == (2,)
  assert forked.dropout.key.value.shape == (3,)


def test_reseed():
  rngs = nnx.Rngs(params=0, dropout=1)
  rngs.params(), rngs.params(), rngs.dropout()
  nnx.reseed(rngs, params=7)
  assert int(rngs.params.count.value) == 0
  # Flax's rule: the new key is the first key of a stream seeded with 7
  assert same(rngs.params.key.value, jax.random.fold_in(jax.random.key(7), 0))
  assert same(rngs.params(), nnx.Rngs(params=7).params.fork()())
  assert int(rngs.dropout.count.value) == 1  # untouched


def test_reseed_inside_module_graph_gives_each_stream_its_own_key():

  class M(nnx.Module):

    def __init__(self):
      self.a = nnx.Rngs(dropout=0)
      self.sub = nnx.Module()
      self.sub.r = nnx.Rngs(dropout=1)

  m = M()
  m.a.dropout(), m.sub.r.dropout()
  nnx.reseed(m, dropout=3)
  base = jax.random.key(3)
  keys = {tuple(jax.random.key_data(s.key.value).tolist()) for s in (m.a.dropout, m.sub.r.dropout)}
  assert keys == {tuple(jax.random.key_data(jax.random.fold_in(base, i)).tolist()) for i in (0, 1)}


def test_reseed_replays_dropout_of_a_layer_that_forked_its_stream():
  model = nnx.Sequential(nnx.Linear(2, 8, rngs=nnx.Rngs(0)),
                         nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=42)))
  x = jnp.ones((1, 2))
  y1 = model(x)
  assert not np.allclose(y1, model(x))  # the stream moved on
  nnx.reseed(model, dropout=42)
  np.testing.assert_allclose(model(x), y1)


def test_reseed_batched_streams_policies():
  rngs = nnx.Rngs(params=0)
  split = nnx.split_rngs(rngs, splits=3, graph_updates=False)
  with pytest.raises(errors.ConfigError, match=r"reseed: the stream at params holds a batch "
                     r"of keys of shape \(3,\); pass policy='match_shape'"):
    nnx.reseed(split, params=1)
  nnx.reseed(split, params=1, policy="match_shape")
  assert split.params.key.value.shape == (3,) and split.params.count.value.shape == (3,)
  with pytest.raises(errors.ConfigError, match="policy must be 'scalars_only', 'match_shape'"):
    nnx.reseed(split, params=1, policy="nope")


# --- an Rngs captured from outside a transform (issue 9, item 4) ------------------


class _Lin(nnx.Module):

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (2, 3)))


def test_vmapped_constructor_with_captured_rngs_error():
  outer = nnx.Rngs(params=0)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=0)
  def create(rngs):
    return _Lin(outer)  # bug: should be _Lin(rngs)

  with pytest.raises(errors.TraceContextError,
                     match=r"Rngs stream 'params' was drawn inside vmap\(.*create\), but "
                     r"its Rngs was created outside it .*Pass the Rngs to the transform "
                     r"as an argument") as info:
    create(nnx.Rngs(params=1))
  assert info.value.stream == "params"
  assert int(outer.params.count.value) == 0  # nothing drawn


def test_vmapped_constructor_with_its_own_rngs_gives_distinct_layers():
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=0)
  def create(rngs):
    return _Lin(rngs)

  w = np.asarray(create(nnx.Rngs(params=1)).w.value)
  assert not np.allclose(w[0], w[1]) and not np.allclose(w[1], w[2])


def test_captured_rngs_inside_scan_and_grad_error():
  outer = nnx.Rngs(0)

  def loss(x):
    return (x * jax.random.normal(outer(), x.shape)).sum()

  with pytest.raises(errors.TraceContextError, match=r"'default' was drawn inside grad"):
    nnx.grad(loss)(jnp.ones(2))

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def step(c, x):
    return c, x + jax.random.normal(outer.default(), ())

  with pytest.raises(errors.TraceContextError, match=r"'default' was drawn inside scan"):
    step(jnp.zeros(()), jnp.ones(3))


def test_rngs_passed_to_vmap_may_be_drawn_inside():
  rngs = nnx.Rngs(0)

  @nnx.split_rngs(splits=2)
  @nnx.vmap(in_axes=0)
  def draw(r):
    return jax.random.key_data(r())

  keys = draw(rngs)
  assert keys.shape[0] == 2 and not np.array_equal(keys[0], keys[1])
