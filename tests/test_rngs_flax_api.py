"""Flax NNX 0.12 Rngs API in spmdnnx: samplers, split/broadcast/fork, with_rngs, fork_rngs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


def key_of(stream_or_key):
  key = stream_or_key.key.value if isinstance(stream_or_key, nnx.RngStream) else stream_or_key
  return np.asarray(jax.random.key_data(key))


def nth(seed, n):
  return jax.random.fold_in(jax.random.key(seed), n)


# --- samplers ------------------------------------------------------------------------


def test_samplers_draw_the_next_key_of_the_stream():
  rngs = nnx.Rngs(0, params=1)
  np.testing.assert_allclose(rngs.normal((2, 3)), jax.random.normal(nth(0, 0), (2, 3)))
  np.testing.assert_allclose(rngs.params.uniform((2,), minval=1.0, maxval=2.0),
                             jax.random.uniform(nth(1, 0), (2,), minval=1.0, maxval=2.0))
  np.testing.assert_array_equal(rngs.params.bernoulli(0.5, (4,)),
                                jax.random.bernoulli(nth(1, 1), 0.5, (4,)))
  assert int(rngs.default.count.value) == 1 and int(rngs.params.count.value) == 2


def test_keyless_initializers():
  rngs = nnx.Rngs(0, params=1)
  np.testing.assert_allclose(rngs.lecun_normal()((2, 3)),
                             jax.nn.initializers.lecun_normal()(nth(0, 0), (2, 3)))
  init = rngs.params.variance_scaling(2.0, "fan_in", "uniform")
  np.testing.assert_allclose(
      init((3, 2)), jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")(nth(1, 0), (3, 2)))


@pytest.mark.parametrize("name", ["bits", "randint", "permutation", "choice", "gumbel",
                                  "categorical", "orthogonal", "truncated_normal",
                                  "glorot_uniform", "he_normal", "xavier_normal"])
def test_every_sampler_name_exists_on_rngs_and_streams(name):
  assert callable(getattr(nnx.Rngs(0), name))
  assert callable(getattr(nnx.Rngs(0).default, name))


# --- stream split / broadcast / fork -------------------------------------------------


def test_stream_split_broadcast_fork():
  s = nnx.RngStream(0, tag="params")
  split = s.split((2, 3))
  assert split.key.value.shape == (2, 3) and split.count.value.shape == (2, 3)
  np.testing.assert_array_equal(key_of(split.key.value), key_of(jax.random.split(nth(0, 0), (2, 3))))
  b = s.broadcast(4)
  assert b.key.value.shape == (4,) and b.count.value.shape == (4,)
  assert (key_of(b.key.value) == key_of(nth(0, 1))).all()
  f = s.fork()
  np.testing.assert_array_equal(key_of(f), key_of(nth(0, 2)))
  assert int(s.count.value) == 3 and f.tag == "params"


def test_rngs_split_and_broadcast_mappings():
  rngs = nnx.Rngs(params=0, dropout=1, noise=2)
  out = rngs.split({"params": 4, ...: (2, 3)})
  assert out.params.key.value.shape == (4,) and out.dropout.key.value.shape == (2, 3)
  out = rngs.broadcast({"params": 5, "dropout": None})
  assert out.params.key.value.shape == (5,)
  # None / unmatched: the base key is carried over with a fresh counter (Flax)
  np.testing.assert_array_equal(key_of(out.dropout), key_of(rngs.dropout))
  assert int(out.dropout.count.value) == 0


def test_rngs_from_a_stream_takes_its_base_key_and_restarts_the_count():
  a = nnx.Rngs(params=0)
  a.params()
  b = nnx.Rngs(params=a.params)
  assert b.params is not a.params
  np.testing.assert_array_equal(key_of(b.params()), key_of(nth(0, 0)))


def test_raw_uint32_key_data_is_accepted_batched():
  data = jax.random.key_data(jax.random.split(jax.random.key(0), 3))
  s = nnx.RngStream(data, tag="x")
  assert s.key.value.shape == (3,) and s.count.value.shape == (3,)


def test_repr_names_streams_keys_and_counts():
  rngs = nnx.Rngs(0, params=1)
  rngs.params()
  text = repr(rngs)
  assert text.startswith("Rngs(params=RngStream(tag='params', key=key([0, 1]), count=1)")
  assert "default=RngStream(tag='default', key=key([0, 0]), count=0)" in text


def test_dunder_lookups_are_attribute_errors_not_streams():
  rngs = nnx.Rngs(0)
  with pytest.raises(AttributeError):
    rngs.__json__  # noqa: B018


# --- split_rngs / fork_rngs / restore_rngs ------------------------------------------


def test_split_rngs_in_place_returns_backups_to_restore():
  rngs = nnx.Rngs(params=0, dropout=1)
  backups = nnx.split_rngs(rngs, splits=5)
  assert rngs.params.key.value.shape == (5,) and rngs.dropout.count.value.shape == (5,)
  assert len(backups) == 2
  nnx.restore_rngs(backups)
  assert rngs.params.key.value.shape == () and int(rngs.params.count.value) == 1


@pytest.mark.parametrize("graph,graph_updates", [(True, False), (False, True), (False, False)])
def test_split_rngs_on_a_copy(graph, graph_updates):
  rngs = nnx.Rngs(params=0, dropout=1)
  out = nnx.split_rngs(rngs, splits=5, only="params", graph=graph, graph_updates=graph_updates)
  assert rngs.params.key.value.shape == ()
  assert out.params.key.value.shape == (5,) and out.dropout.key.value.shape == ()
  np.testing.assert_array_equal(key_of(out.params), key_of(jax.random.split(nth(0, 0), 5)))


def test_split_rngs_decorator_in_tree_mode_passes_a_copy():
  rngs = nnx.Rngs(0)

  @nnx.split_rngs(splits=3, graph=False)
  def f(r):
    return r.default.key.value.shape

  assert f(rngs) == (3,)
  assert rngs.default.key.value.shape == ()


def test_fork_rngs_in_place_and_on_a_copy():
  rngs = nnx.Rngs(params=0, dropout=1)
  with nnx.fork_rngs(rngs, split={"dropout": 4}):  # a mapping forks only what it names
    np.testing.assert_array_equal(key_of(rngs.params), key_of(jax.random.key(0)))
    assert rngs.dropout.key.value.shape == (4,)
  with nnx.fork_rngs(rngs):
    np.testing.assert_array_equal(key_of(rngs.params), key_of(nth(0, 0)))
  np.testing.assert_array_equal(key_of(rngs.params), key_of(jax.random.key(0)))
  assert int(rngs.params.count.value) == 1 and int(rngs.dropout.count.value) == 2
  out = nnx.fork_rngs(rngs, graph_updates=False)
  np.testing.assert_array_equal(key_of(out.params), key_of(nth(0, 1)))
  assert int(out.params.count.value) == 0


def test_fork_rngs_decorator():
  rngs = nnx.Rngs(0)

  @nnx.fork_rngs()
  def f(r):
    return key_of(r.default)

  np.testing.assert_array_equal(f(rngs), key_of(nth(0, 0)))
  np.testing.assert_array_equal(key_of(rngs.default), key_of(jax.random.key(0)))


# --- with_rngs -----------------------------------------------------------------------


def test_with_rngs_split_broadcast_fork():
  rngs = nnx.Rngs(params=0, dropout=1, noise=2)
  out = nnx.with_rngs(rngs, split={"params": 4}, broadcast={"noise": 2}, fork=...)
  assert out.params.key.value.shape == (4,)
  assert out.noise.key.value.shape == (2,)
  np.testing.assert_array_equal(key_of(out.dropout), key_of(nth(1, 0)))
  # originals keep their base keys but advanced one draw
  assert rngs.params.key.value.shape == () and int(rngs.params.count.value) == 1


def test_with_rngs_unmatched_streams_are_copied_unchanged():
  rngs = nnx.Rngs(params=0, dropout=1)
  out = nnx.with_rngs(rngs, fork="params")
  assert out.dropout is not rngs.dropout
  np.testing.assert_array_equal(key_of(out.dropout), key_of(rngs.dropout))
  assert int(rngs.dropout.count.value) == 0


def test_with_rngs_keeps_shared_streams_shared_in_the_copy():
  rngs = nnx.Rngs(0)
  tree = {"a": rngs, "b": rngs.default}
  out = nnx.with_rngs(tree, split=2)
  assert out["a"].default is out["b"]
  assert out["b"].key.value.shape == (2,)


def test_with_rngs_only_filter_and_decorator():
  rngs = nnx.Rngs(params=0, dropout=1)
  out = nnx.with_rngs(rngs, split=3, only="dropout")
  assert out.params.key.value.shape == () and out.dropout.key.value.shape == (3,)

  @nnx.with_rngs(split=4)
  def f(r):
    return r.params.key.value.shape

  assert f(rngs) == (4,)


def test_with_rngs_conflicting_rules_error():
  rngs = nnx.Rngs(params=0)
  with pytest.raises(errors.TransformError, match=r"with_rngs: the RngStream at params matches "
                     r"multiple rules: split by filter 'params'; fork by filter 'params'"):
    nnx.with_rngs(rngs, split={"params": 4}, fork="params")
  with pytest.raises(ValueError, match="multiple rules"):
    nnx.with_rngs(rngs, broadcast={"params": 4}, fork="params")


# --- plain JAX transforms ------------------------------------------------------------


def test_drawing_a_captured_stream_inside_jax_jit_raises():
  rngs = nnx.Rngs(0)

  @jax.jit
  def f(x):
    return x + jax.random.normal(rngs.params(), ())

  with pytest.raises(errors.TraceContextError,
                     match="Cannot mutate RngCount from a different trace level: Rngs stream "
                     "'default' was created outside the jax transform"):
    f(1.0)
  assert int(rngs.default.count.value) == 0


def test_a_stream_created_inside_jax_jit_cannot_be_drawn_outside():
  made = []

  @jax.jit
  def g():
    made.append(nnx.Rngs(1))
    return 0

  g()
  with pytest.raises(errors.TraceContextError, match="different trace level"):
    made[0].params()


def test_a_stream_created_and_drawn_inside_jax_jit_works():

  @jax.jit
  def h(seed):
    return nnx.Rngs(seed).normal(())

  np.testing.assert_allclose(h(3), jax.random.normal(nth(3, 0), ()))


def test_repr_of_abstract_and_batched_streams():
  drop = nnx.eval_shape(lambda: nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1)))
  assert repr(drop.rngs) == "RngStream(tag='dropout', key=<key shape ()>, count=<shape ()>)"
  split = nnx.Rngs(0).split(3)
  assert repr(split.default) == ("RngStream(tag='default', key=keys(shape=(3,)), "
                                 "count=<shape (3,)>)")
