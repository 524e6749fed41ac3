"""Tests for spmdnnx._transforms.jit: graph objects through a lifted jax.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Count(nnx.Variable):
  pass


class Linear(nnx.Module):

  def __init__(self, din, dout, *, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (din, dout)))
    self.bias = nnx.Param(jnp.zeros(dout))

  def __call__(self, x):
    return x @ self.kernel + self.bias


class Counter(nnx.Module):

  def __init__(self):
    self.count = Count(jnp.array(0))

  def __call__(self):
    self.count += 1
    return self.count.value


class BatchNorm(nnx.Module):

  def __init__(self, n):
    self.mean = nnx.BatchStat(jnp.zeros(n))
    self.use_running_average = False

  def __call__(self, x):
    if not self.use_running_average:
      self.mean.value = 0.5 * self.mean.value + 0.5 * x.mean(0)
    return x - self.mean.value


class Model(nnx.Module):

  def __init__(self, *, rngs):
    self.layers = [Linear(2, 2, rngs=rngs)]
    self.bn = BatchNorm(2)
    self.deterministic = True
    self.count = Count(jnp.array(0))

  def __call__(self, x):
    self.count += 1
    for layer in self.layers:
      x = layer(x)
    x = self.bn(x)
    return x if self.deterministic else x * 10.0

  @nnx.jit
  def jitted_call(self, x):
    return self(x)


def model(seed=0):
  return Model(rngs=nnx.Rngs(seed))


X = jnp.arange(6.0).reshape(3, 2)


def eager(m, x):
  return nnx.clone(m)(x)


def test_module_first_argument():
  m = model()
  expected = eager(m, X)
  out = nnx.jit(lambda m, x: m(x))(m, X)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert int(m.count.value) == 1


def test_module_in_any_position_and_kwargs():
  m = model()
  expected = eager(m, X)
  f = nnx.jit(lambda x, scale, m: m(x) * scale)
  np.testing.assert_allclose(f(X, 2.0, m), expected * 2.0, rtol=1e-6)
  g = nnx.jit(lambda x, *, model: model(x))
  for _ in range(2):
    expected = eager(m, X)
    np.testing.assert_allclose(g(X, model=m), expected, rtol=1e-6)
  assert int(m.count.value) == 3


def test_plain_kwargs():
  f = nnx.jit(lambda x, *, y: x + y)
  np.testing.assert_array_equal(f(jnp.ones(2), y=jnp.ones(2)), [2.0, 2.0])


def test_method_decorator():
  m = model()
  expected = eager(m, X)
  np.testing.assert_allclose(m.jitted_call(X), expected, rtol=1e-6)
  m.jitted_call(X)
  assert int(m.count.value) == 2
  other = model(1)
  expected = eager(other, X)
  np.testing.assert_allclose(other.jitted_call(X), expected, rtol=1e-6)
  assert int(m.count.value) == 2 and int(other.count.value) == 1


def test_decorator_on_dunder_call():

  class Doubler(nnx.Module):

    def __init__(self):
      self.n = Count(jnp.array(0))

    @nnx.jit
    def __call__(self, x):
      self.n += 1
      return x * 2

  d = Doubler()
  np.testing.assert_array_equal(d(jnp.ones(2)), [2.0, 2.0])
  d(jnp.ones(2))
  assert int(d.n.value) == 2


def test_static_argnums_and_argnames():
  traces = []

  def f(x, n):
    traces.append(n)
    return x * n

  g = nnx.jit(f, static_argnums=1)
  np.testing.assert_array_equal(g(jnp.ones(2), 3), [3.0, 3.0])
  np.testing.assert_array_equal(g(jnp.ones(2), 3), [3.0, 3.0])
  np.testing.assert_array_equal(g(jnp.ones(2), 4), [4.0, 4.0])
  assert traces == [3, 4]
  h = nnx.jit(lambda x, *, n: x * n, static_argnames="n")
  np.testing.assert_array_equal(h(jnp.ones(2), n=5), [5.0, 5.0])


def test_static_argnums_with_module():
  m = model()
  f = nnx.jit(lambda m, x, act: act(m(x)), static_argnums=2)
  expected = jax.nn.relu(eager(m, X))
  np.testing.assert_allclose(f(m, X, jax.nn.relu), expected, rtol=1e-6)
  assert int(m.count.value) == 1


def test_static_negative_argnum():
  f = nnx.jit(lambda x, n: x * n, static_argnums=-1)
  np.testing.assert_array_equal(f(jnp.ones(1), 2), [2.0])


def test_unhashable_static_arg_error():
  g = nnx.jit(lambda x, n: x * len(n), static_argnums=1)
  with pytest.raises(errors.TransformError,
                     match=r"jit\(.*<lambda>\): static positional argument 1 is a list, which "
                     r"is not hashable, so it cannot key the compilation cache\. Pass a "
                     r"hashable value \(e\.g\. a tuple instead of a list"):
    g(jnp.ones(2), [1, 2])
  h = nnx.jit(lambda x, *, n: x, static_argnames="n")
  with pytest.raises(errors.TransformError, match=r"static argument 'n' is a dict, which is "
                     r"not hashable"):
    h(jnp.ones(2), n={})


def test_unhashable_static_arg_error_after_warm_call():
  g = nnx.jit(lambda x, n: x * len(n), static_argnums=1)
  g(jnp.ones(2), (1, 2))
  with pytest.raises(errors.TransformError,
                     match=r"(?s)not hashable.*Pass a hashable value \(a tuple instead of a list"):
    g(jnp.ones(2), [1, 2])


def test_donate_argnums_on_module():
  m = model()
  kernel_before = m.layers[0].kernel.value
  expected = eager(m, X)
  f = nnx.jit(lambda m, x: m(x), donate_argnums=0)
  np.testing.assert_allclose(f(m, X), expected, rtol=1e-6)
  expected = eager(m, X)
  np.testing.assert_allclose(f(m, X), expected, rtol=1e-6)
  assert int(m.count.value) == 2
  assert m.layers[0].kernel.value is not kernel_before  # the module got new buffers
  np.testing.assert_allclose(np.asarray(m.layers[0].kernel.value),
                             np.asarray(model().layers[0].kernel.value))


def test_returning_a_new_module():

  @nnx.jit
  def create(seed):
    return Model(rngs=nnx.Rngs(seed))

  m = create(jnp.array(0))
  assert type(m) is Model
  np.testing.assert_allclose(m.layers[0].kernel.value, model(0).layers[0].kernel.value)
  assert isinstance(m.layers[0].kernel.value, jax.Array)
  assert not isinstance(m.layers[0].kernel.value, jax.core.Tracer)
  m(X)  # usable eagerly


def test_returning_an_input_module_gives_same_object():
  m = model()
  out_m, y = nnx.jit(lambda m, x: (m, m(x)))(m, X)
  assert out_m is m
  sub = nnx.jit(lambda m: m.layers[0])(m)
  assert sub is m.layers[0]
  var = nnx.jit(lambda m: m.count)(m)
  assert var is m.count


def test_counter_state_propagates():
  c = Counter()
  step = nnx.jit(lambda c: c())
  outs = [int(step(c)) for _ in range(4)]
  assert outs == [1, 2, 3, 4]
  assert int(c.count.value) == 4
  assert type(c.count) is Count


def test_batchnorm_like_state_propagates():
  bn = BatchNorm(2)
  f = nnx.jit(lambda bn, x: bn(x))
  x = jnp.array([[1.0, 3.0], [3.0, 5.0]])
  f(bn, x)
  f(bn, x)
  np.testing.assert_allclose(bn.mean.value, [1.5, 3.0])
  bn.use_running_average = True
  f(bn, x * 100)
  np.testing.assert_allclose(bn.mean.value, [1.5, 3.0])


def test_shared_module_passed_twice():
  c = Counter()
  f = nnx.jit(lambda a, b: (a(), b(), a is b))
  x, y, identical = f(c, c)
  assert identical
  assert (int(x), int(y)) == (1, 2)
  assert int(c.count.value) == 2


class Trainer(nnx.Module):
  """Optimizer-like object holding the model it updates."""

  def __init__(self, model):
    self.model = model
    self.step = Count(jnp.array(0))

  def update(self, grads):
    self.step += 1
    params = nnx.state(self.model, nnx.Param)
    nnx.update(self.model, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))


def test_model_and_optimizer_like_object_share_model():
  m = model()
  opt = Trainer(m)
  y = jnp.ones((3, 2))

  @nnx.jit
  def train_step(m, opt, x):
    assert opt.model is m
    loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(m)
    opt.update(grads)
    return loss

  losses = [float(train_step(m, opt, X)) for _ in range(4)]
  assert losses[-1] < losses[0]
  assert opt.model is m
  assert int(opt.step.value) == 4
  assert int(m.count.value) == 4


def test_structural_change_append_layer():
  m = model()
  f = nnx.jit(lambda m, x: m(x))
  f(m, X)
  m.layers.append(Linear(2, 2, rngs=nnx.Rngs(5)))
  expected = eager(m, X)
  np.testing.assert_allclose(f(m, X), expected, rtol=1e-5)
  f(m, X)
  assert int(m.count.value) == 3


def test_structural_change_replace_submodule():
  m = model()
  f = nnx.jit(lambda m, x: m(x))
  f(m, X)
  m.bn = BatchNorm(2)
  m.bn.use_running_average = True
  np.testing.assert_allclose(f(m, X), m.layers[0](X), rtol=1e-5)
  m.layers[0] = Linear(2, 2, rngs=nnx.Rngs(9))
  np.testing.assert_allclose(f(m, X), m.layers[0](X), rtol=1e-5)


def test_structural_change_static_attribute():
  m = model()
  f = nnx.jit(lambda m, x: m(x))
  a = f(m, X)
  m.eval()  # use_running_average=True keeps bn fixed from here
  m.deterministic = False
  b = f(m, X)
  np.testing.assert_allclose(b, eager(m, X), rtol=1e-5)
  m.deterministic = True
  c = f(m, X)
  np.testing.assert_allclose(b, c * 10.0, rtol=1e-5)
  assert not np.allclose(a, b)


def test_structural_change_inside_jit_propagates():

  @nnx.jit
  def add_var(m):
    m.extra = nnx.Param(jnp.ones(2))
    m.layers[0].bias.value = m.layers[0].bias.value + 1

  m = model()
  add_var(m)
  assert type(m.extra) is nnx.Param
  assert not isinstance(m.extra.value, jax.core.Tracer)
  np.testing.assert_array_equal(m.layers[0].bias.value, [1.0, 1.0])


def test_metadata_change_between_calls():
  m = model()
  f = nnx.jit(lambda m: m.layers[0].kernel.value.sum())
  f(m)
  m.layers[0].kernel.set_metadata(logical_axes=("embed", "mlp"))
  f(m)
  assert m.layers[0].kernel.logical_axes == ("embed", "mlp")


def test_tracer_leak_into_captured_module_variable():
  m = model()

  @nnx.jit
  def leak(x):
    m.layers[0].bias.value = x
    return x

  with pytest.raises(errors.TraceContextError,
                     match=r"Cannot assign a traced value to this Param inside jit\(.*leak\): "
                     r"the Variable was created outside the transform, so the tracer would "
                     r"leak out of it\. Pass the Module \(or Variable\) that owns it to the "
                     r"transform as an argument"):
    leak(jnp.ones(2))
  assert not isinstance(m.layers[0].bias.value, jax.core.Tracer)


def test_tracer_leak_into_captured_module_attribute():
  m = model()

  @nnx.jit
  def leak(x):
    m.cache = x
    return x

  with pytest.raises(errors.TraceContextError,
                     match=r"Cannot set Model\.cache to a traced value inside jit\(.*leak\): "
                     r"this object was created outside the transform"):
    leak(jnp.ones(2))
  assert not hasattr(m, "cache")


def test_tracer_leak_via_inplace_operator():
  c = Counter()

  @nnx.jit
  def leak(x):
    c.count += x

  with pytest.raises(errors.TraceContextError, match="Cannot assign a traced value to this Count"):
    leak(jnp.array(1))


def test_nodes_nested_in_tuple_and_dict_arguments():
  m = model()
  c = Counter()

  @nnx.jit
  def f(pair, d):
    a, b = pair
    b()
    return a(d["x"]) + d["scale"], d["counter"]()

  expected = eager(m, X) + 1.0
  y, n = f((m, c), {"x": X, "scale": 1.0, "counter": c})
  np.testing.assert_allclose(y, expected, rtol=1e-6)
  assert int(n) == 2 and int(c.count.value) == 2
  assert int(m.count.value) == 1
  f((m, c), {"x": X, "scale": 1.0, "counter": c})
  assert int(c.count.value) == 4


def test_list_of_modules_argument():
  cs = [Counter(), Counter()]
  nnx.jit(lambda cs: [c() for c in cs])(cs)
  assert [int(c.count.value) for c in cs] == [1, 1]


def test_variable_argument():
  v = Count(jnp.array(1))

  @nnx.jit
  def bump(v):
    v.value = v.value * 3

  bump(v)
  bump(v)
  assert int(v.value) == 9 and type(v) is Count


def test_raw_array_attribute_updated():
  m = nnx.Module()
  m.buf = jnp.zeros(2)

  @nnx.jit
  def f(m):
    m.buf = m.buf + 1

  f(m)
  f(m)
  np.testing.assert_array_equal(m.buf, [2.0, 2.0])


def test_shared_variable_inside_jit_stays_shared():
  m = nnx.Module()
  m.w = nnx.Param(jnp.ones(2))
  m.alias = m.w

  @nnx.jit
  def f(m):
    assert m.alias is m.w
    m.alias.value = m.alias.value * 2

  f(m)
  assert m.alias is m.w
  np.testing.assert_array_equal(m.w.value, [2.0, 2.0])


def test_cache_reused_for_same_structure():
  traces = []

  @nnx.jit
  def f(m, x):
    traces.append(1)
    return m(x)

  m1, m2 = model(0), model(1)
  f(m1, X)
  f(m1, X)
  expected = eager(m2, X)
  np.testing.assert_allclose(f(m2, X), expected, rtol=1e-6)
  assert len(traces) == 1


def test_jax_jit_kwargs_passthrough_and_lower():
  m = model()
  f = nnx.jit(lambda m, x: m(x), keep_unused=True)
  expected = eager(m, X)
  np.testing.assert_allclose(f(m, X), expected, rtol=1e-6)
  text = f.lower(m, X).as_text()
  assert "dot" in text or "dot_general" in text


def test_shared_module_nested_twice_in_one_argument():
  c = Counter()
  x, y, identical = nnx.jit(lambda pair: (pair[0](), pair[1](), pair[0] is pair[1]))((c, c))
  assert identical
  assert (int(x), int(y)) == (1, 2)
  assert int(c.count.value) == 2


def test_returning_state_and_new_variables():
  m = model()

  @nnx.jit
  def f(m):
    return nnx.state(m, nnx.Param), nnx.Param(jnp.ones(2), logical_axes=("embed",))

  params, var = f(m)
  assert type(params) is nnx.State
  assert [p for p, _ in params.flat_state()] == [
      ("layers", 0, "bias"), ("layers", 0, "kernel")]
  # nnx.state holds the live Variables (Flax 0.12): the caller's, after jit.
  assert params.layers[0].kernel is m.layers[0].kernel
  np.testing.assert_array_equal(params.layers[0].kernel.value, m.layers[0].kernel.value)
  assert type(var) is nnx.Param and var.logical_axes == ("embed",)
  assert not isinstance(var.value, jax.core.Tracer)


def test_module_appended_to_an_initially_empty_list_is_picked_up():
  class Holder(nnx.Module):
    def __init__(self):
      self.layers = []          # static while empty
      self.n = nnx.Variable(jnp.array(0))

    def __call__(self, x):
      self.n += 1
      for layer in self.layers:
        x = layer(x)
      return x

  @nnx.jit
  def f(m, x):
    return m(x)

  m = Holder()
  x = jnp.ones((1, 2))
  assert f(m, x).shape == (1, 2)
  m.layers.append(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
  assert f(m, x).shape == (1, 3)
  assert int(m.n.value) == 2
