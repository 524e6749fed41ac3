"""custom_vjp over graph objects: both modes, DiffState, nondiff args, updates, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spmdnnx as nnx
from spmdnnx import errors


class Foo(nnx.Module):
  def __init__(self, x=1.0, y=2.0):
    self.x = nnx.Param(jnp.array(x), logical_axes=())
    self.y = nnx.Param(jnp.array(y))
    self.count = nnx.BatchStat(jnp.array(0))
    self.calls = 0


def sin_xy(m):
  return jnp.sin(m.x[...]) * m.y[...]


def graph_rule(scale=1.0, seen=None, primal=sin_xy):
  """A graph-mode fwd/bwd pair for sin(x) * y; bwd scales the true gradient."""

  def fwd(m):
    return primal(m), (jnp.cos(m.x[...]), jnp.sin(m.x[...]), m)

  def bwd(res, g):
    cos_x, sin_x, m = res
    (m_g,), out_g = g
    if seen is not None:
      seen.append(m_g)
    m_g["x"][...] = scale * cos_x * out_g * m.y[...]
    m_g["y"][...] = scale * sin_x * out_g
    return (m_g,)

  return fwd, bwd


def tree_rule(scale=1.0):
  def fwd(m):
    return sin_xy(m), (jnp.cos(m.x[...]), jnp.sin(m.x[...]), m)

  def bwd(res, g):
    cos_x, sin_x, m = res
    m_g = nnx.clone(m)
    m_g.x[...] = scale * cos_x * g * m.y[...]
    m_g.y[...] = scale * sin_x * g
    return (m_g,)

  return fwd, bwd


def test_graph_mode_bwd_gets_states_and_the_rule_is_used():
  seen = []

  @nnx.custom_vjp
  def f(m):
    m.count[...] += 1
    m.calls += 1
    return sin_xy(m)

  f.defvjp(*graph_rule(scale=10.0, seen=seen, primal=f))   # fwd calls f
  m = Foo()
  grads = nnx.grad(f, argnums=nnx.DiffState(0, nnx.Param))(m)
  # The custom rule (10x the true gradient) is what grad returns.
  np.testing.assert_allclose(grads["x"][...], 10 * np.cos(1.0) * 2.0, rtol=1e-6)
  np.testing.assert_allclose(grads["y"][...], 10 * np.sin(1.0), rtol=1e-6)
  # bwd saw a State of every Variable of the Module, metadata kept.
  (m_g,) = seen
  assert isinstance(m_g, nnx.State)
  assert set(m_g.keys()) == {"x", "y", "count"}
  assert m_g["x"].logical_axes == ()
  assert grads["x"].logical_axes == ()
  # Mutations inside (a Variable and a static attribute) flowed back once.
  assert int(m.count[...]) == 1 and m.calls == 1


def test_graph_mode_plain_call_and_mutation_without_grad():
  @nnx.custom_vjp
  def f(m, x):
    m.count[...] += 2
    return m.x * x

  f.defvjp(lambda m, x: (f(m, x), ()), lambda res, g: (None, None))
  m = Foo()
  y = f(m, jnp.array(3.0))
  np.testing.assert_allclose(y, 3.0)
  assert int(m.count[...]) == 2


def test_graph_mode_array_argument_gets_none_in_inputs_g():
  @nnx.custom_vjp
  def f(m, x):
    return m.x * x

  def bwd(res, g):
    (m_g, x_g), out_g = g
    assert x_g is None
    m_g["x"][...] = 7.0 * out_g
    return m_g, 5.0 * out_g

  f.defvjp(lambda m, x: (f(m, x), ()), bwd)
  m_grad, x_grad = nnx.grad(f, argnums=(0, 1))(Foo(), jnp.array(3.0))
  np.testing.assert_allclose(m_grad["x"][...], 7.0)
  np.testing.assert_allclose(x_grad, 5.0)


def test_arrays_only_in_both_modes():
  @nnx.custom_vjp
  def f(x):
    return jnp.sin(x)

  f.defvjp(lambda x: (f(x), jnp.cos(x)), lambda c, g: (3.0 * c * g[1],))
  assert float(jax.grad(f)(0.0)) == 3.0

  @nnx.custom_vjp(graph=False)
  def h(x):
    return jnp.sin(x)

  h.defvjp(lambda x: (h(x), jnp.cos(x)), lambda c, g: (2.0 * c * g,))
  assert float(jax.grad(h)(0.0)) == 2.0


@pytest.mark.parametrize("graph", [True, False])
def test_tree_mode_untouched_variables_keep_their_gradient_path(graph):
  # A Variable the function does not mutate keeps its input value outside, so a
  # later use in the same loss still gets its (non-custom) gradient.
  @nnx.custom_vjp(graph=graph, graph_updates=False)
  def f(m):
    return sin_xy(m)

  f.defvjp(*tree_rule())

  def loss(m):
    return f(m) + 5.0 * m.y[...]

  g = nnx.grad(loss, graph=graph, graph_updates=False)(Foo())
  np.testing.assert_allclose(g.y[...], np.sin(1.0) + 5.0, rtol=1e-6)


def test_graph_mode_later_uses_keep_their_gradient_when_bwd_drops_inputs_g():
  # bwd builds fresh tangents (ignoring inputs_g); the untouched y used after the
  # call still gets its direct gradient (the value outside is the input's).
  @nnx.custom_vjp
  def f(m):
    return sin_xy(m)

  def bwd(res, g):
    cos_x, sin_x, m = res
    _, out_g = g
    return (nnx.State({"x": cos_x * out_g * m.y[...], "y": sin_x * out_g}),)

  f.defvjp(lambda m: (f(m), (jnp.cos(m.x[...]), jnp.sin(m.x[...]), m)), bwd)
  g = nnx.grad(lambda m: f(m) + 5.0 * m.y[...])(Foo())
  np.testing.assert_allclose(g["y"][...], np.sin(1.0) + 5.0, rtol=1e-6)
  np.testing.assert_allclose(g["x"][...], np.cos(1.0) * 2.0, rtol=1e-6)


def test_diff_state_limits_the_differentiated_variables():
  only_x = nnx.PathContains("x")

  @nnx.custom_vjp(nondiff_argnums=(nnx.DiffState(0, only_x),))
  def f(m):
    return sin_xy(m)

  def bwd(res, g):
    cos_x, m = res
    (m_g,), out_g = g
    m_g["x"][...] = cos_x * out_g * m.y[...]
    m_g["y"][...] = 100.0 * out_g   # not differentiated: ignored
    return (m_g,)

  f.defvjp(lambda m: (f(m), (jnp.cos(m.x[...]), m)), bwd)
  m = Foo()
  grads = nnx.grad(f, argnums=nnx.DiffState(0, nnx.Param))(m)
  np.testing.assert_allclose(grads["x"][...], np.cos(1.0) * 2.0, rtol=1e-6)
  np.testing.assert_allclose(grads["y"][...], 0.0)


@pytest.mark.parametrize("graph,updates", [(True, False), (False, False)])
def test_tree_modes_use_objects_for_tangents(graph, updates):
  @nnx.custom_vjp(graph=graph, graph_updates=updates)
  def f(m):
    return sin_xy(m)

  f.defvjp(*tree_rule(scale=3.0))
  m = Foo()
  grads = nnx.grad(f, graph=graph, graph_updates=updates)(m)
  assert type(grads) is Foo
  np.testing.assert_allclose(grads.x[...], 3 * np.cos(1.0) * 2.0, rtol=1e-6)
  np.testing.assert_allclose(grads.y[...], 3 * np.sin(1.0), rtol=1e-6)


@pytest.mark.parametrize("graph,updates", [(True, True), (True, False), (False, False)])
def test_int_nondiff_argnums_stay_static_under_jit(graph, updates):
  @nnx.custom_vjp(nondiff_argnums=(0, 2), graph=graph, graph_updates=updates)
  def f(a, x, b):
    assert (a, b) == (1, "two")   # static Python values, not tracers
    return x * a

  def bwd(a, b, res, g):
    assert (a, b) == (1, "two")
    out_g = g[1] if graph and updates else g
    return (4.0 * out_g,)

  f.defvjp(lambda a, x, b: (f(a, x, b), ()), bwd)
  g = jax.jit(jax.grad(lambda x: f(1, x, "two")))(jnp.array(2.0))
  np.testing.assert_allclose(g, 4.0)


@pytest.mark.parametrize("graph", [True, False])
def test_tree_mode_nondiff_variable_is_updated(graph):
  state = nnx.BatchStat(jnp.array(0.0))

  @nnx.custom_vjp(nondiff_argnums=(1,), graph=graph, graph_updates=False)
  def f(m, s):
    s[...] = jnp.array(-1.0)
    return m.x * 2.0

  f.defvjp(lambda m, s: (f(m, s), ()), lambda s, res, g: (None,))
  y = f(Foo(), state)
  np.testing.assert_allclose(y, 2.0)
  assert float(state[...]) == -1.0


def test_tree_mode_updates_g_holds_the_mutated_variables_only():
  seen = []

  @nnx.custom_vjp(graph=True, graph_updates=False)
  def f(m):
    m.x[...] += 1.0
    return m.x[...] * m.y[...]

  def bwd(res, g, updates_g):
    (m_up,) = updates_g
    seen.append(m_up)
    (m,) = res
    m_g = nnx.clone(m)
    m_g.x[...] = g * m.y[...]
    m_g.y[...] = g * m.x[...]
    return (m_g,)

  f.defvjp(lambda m: (f(m), (m,)), bwd)
  m = Foo()
  grads = nnx.grad(f, graph=True, graph_updates=False)(m)
  (m_up,) = seen
  assert isinstance(m_up.x, nnx.Param) and m_up.x.logical_axes == ()
  assert m_up.y is None and m_up.count is None
  np.testing.assert_allclose(grads.x[...], 2.0)   # g * y
  np.testing.assert_allclose(grads.y[...], 2.0)   # g * (x + 1)
  assert float(m.x[...]) == 2.0   # the mutation flowed back


def test_tree_mode_output_object_and_its_cotangent():
  @nnx.custom_vjp(graph=False)
  def f(m1, m2):
    return sin_xy(m1), nnx.clone(m2)

  def bwd(res, g):
    y_g, m2_g = g
    cos_x, sin_x, m1 = res
    assert type(m2_g) is Foo
    m1_g = nnx.clone(m1)
    m1_g.x[...] = cos_x * y_g * m1.y[...]
    m1_g.y[...] = sin_x * y_g
    return m1_g, m2_g

  f.defvjp(lambda m1, m2: (f(m1, m2), (jnp.cos(m1.x[...]), jnp.sin(m1.x[...]), m1)), bwd)

  def loss(m1, m2):
    y, out = f(m1, m2)
    return y + out.x[...] * out.y[...]

  g1, g2 = nnx.grad(loss, argnums=(0, 1), graph=False)(Foo(), Foo(3.0, 4.0))
  np.testing.assert_allclose(g1.x[...], np.cos(1.0) * 2.0, rtol=1e-6)
  np.testing.assert_allclose(g2.x[...], 4.0)
  np.testing.assert_allclose(g2.y[...], 3.0)


def test_graph_mode_returned_input_keeps_identity_and_gets_gradients():
  @nnx.custom_vjp
  def f(m1, m2):
    return sin_xy(m1), m2

  def bwd(res, g):
    (m1_g, m2_g), (y_g, _) = g
    cos_x, sin_x, m1 = res
    m1_g = nnx.State({"x": cos_x * y_g * m1.y[...], "y": sin_x * y_g})
    return m1_g, nnx.State({"x": m2_g["x"], "y": m2_g["y"]})

  f.defvjp(lambda m1, m2: (f(m1, m2), (jnp.cos(m1.x[...]), jnp.sin(m1.x[...]), m1)), bwd)
  m2 = Foo(3.0, 4.0)
  _, out = f(Foo(), m2)
  assert out is m2

  def loss(m1, m2):
    y, m2 = f(m1, m2)
    return y + m2.x[...] * m2.y[...]

  g1, g2 = nnx.grad(loss, argnums=(0, 1))(Foo(), m2)
  np.testing.assert_allclose(g1["y"][...], np.sin(1.0), rtol=1e-6)
  np.testing.assert_allclose(g2["x"][...], 4.0)
  np.testing.assert_allclose(g2["y"][...], 3.0)


@pytest.mark.parametrize("graph,updates", [(True, True), (False, False)])
def test_with_remat_and_jit(graph, updates):
  @nnx.custom_vjp(graph=graph, graph_updates=updates)
  @nnx.remat(graph=graph, graph_updates=updates)
  def f(m):
    return sin_xy(m)

  f.defvjp(*(graph_rule(2.0) if updates else tree_rule(2.0)))

  @nnx.jit(graph=graph, graph_updates=updates)
  def loss(m):
    return f(m)

  grads = nnx.grad(loss, graph=graph, graph_updates=updates)(Foo())
  x = grads["x"] if updates else grads.x
  np.testing.assert_allclose(x[...], 2 * np.cos(1.0) * 2.0, rtol=1e-6)


def test_state_arguments_in_tree_mode():
  m = Foo()
  graphdef, sx, rest = nnx.split(m, nnx.PathContains("x"), ...)

  @nnx.custom_vjp(nondiff_argnums=(1,), graph=True, graph_updates=False)
  def f(sx, rest):
    return sin_xy(nnx.merge(graphdef, sx, rest))

  def bwd(rest, res, g):
    cos_x, sx = res
    sx_g = nnx.clone(sx)
    sx_g.x[...] = cos_x * g * rest.y[...]
    return (sx_g,)

  f.defvjp(lambda sx, rest: (f(sx, rest), (jnp.cos(sx.x[...]), sx)), bwd)
  g = nnx.grad(f, graph=True, graph_updates=False)(sx, rest)
  assert isinstance(g, nnx.State)
  np.testing.assert_allclose(g["x"][...], np.cos(1.0) * 2.0, rtol=1e-6)


# --- errors ---------------------------------------------------------------------------


def test_diff_state_refused_without_graph_updates():
  for kw in ({"graph": False}, {"graph": True, "graph_updates": False}):
    with pytest.raises(errors.TransformError, match="`nondiff_argnums` cannot contain `DiffState`"):
      nnx.custom_vjp(lambda m: m, nondiff_argnums=(nnx.DiffState(0, ...),), **kw)


def test_repeated_and_bad_nondiff_argnums():
  with pytest.raises(errors.TransformError, match="argnum 0 is repeated"):
    nnx.custom_vjp(lambda m: m, nondiff_argnums=(0, nnx.DiffState(0, ...)))
  with pytest.raises(errors.TransformError, match="must be ints or nnx.DiffState"):
    nnx.custom_vjp(lambda m: m, nondiff_argnums=("m",))


def test_int_nondiff_on_an_object_in_graph_mode_is_a_type_error():
  @nnx.custom_vjp(nondiff_argnums=(0,))
  def f(m, x):
    return x

  f.defvjp(lambda m, x: (x, ()), lambda m, res, g: (g[1],))
  with pytest.raises(errors.ArgumentError, match=r"nondiff_argnums \[0\] hold graph objects"):
    f(Foo(), jnp.array(1.0))
  assert issubclass(errors.ArgumentError, TypeError)


def test_nondiff_argnum_out_of_range():
  @nnx.custom_vjp(nondiff_argnums=(3,))
  def f(x):
    return x

  f.defvjp(lambda x: (x, ()), lambda *a: (None,))
  with pytest.raises(errors.TransformError, match="names argument 3, but the call has 1"):
    f(jnp.array(1.0))


def test_keyword_arguments_bind_to_positions():
  @nnx.custom_vjp(graph=False)
  def f(m, scale):
    return sin_xy(m) * scale

  def bwd(res, g):
    cos_x, m, scale = res
    m_g = nnx.clone(m)
    m_g.x[...] = cos_x * g * m.y[...] * scale
    m_g.y[...] = jnp.zeros(())
    return m_g, jnp.zeros(())

  f.defvjp(lambda m, scale: (f(m, scale), (jnp.cos(m.x[...]), m, scale)), bwd)
  g = nnx.grad(lambda m: f(m, scale=jnp.array(2.0)), graph=False)(Foo())
  np.testing.assert_allclose(g.x[...], np.cos(1.0) * 4.0, rtol=1e-6)

  def kw_only(x, *, k):
    return x

  h = nnx.custom_vjp(kw_only)
  h.defvjp(lambda x, *, k: (x, ()), lambda r, g: (g[1],))
  with pytest.raises(errors.ArgumentError, match=r"keyword-only argument\(s\) \['k'\]"):
    h(jnp.array(1.0), k=1)
  with pytest.raises(errors.ArgumentError, match="kw_only\\): missing a required argument"):
    h(k=1)


def test_call_before_defvjp():
  f = nnx.custom_vjp(lambda x: x)
  with pytest.raises(errors.TransformError, match=r"call .*\.defvjp\(fwd, bwd\) first"):
    f(jnp.array(1.0))


def test_symbolic_zeros_refused():
  f = nnx.custom_vjp(lambda x: x)
  with pytest.raises(errors.TransformError, match="symbolic_zeros=True is not supported"):
    f.defvjp(lambda x: (x, ()), lambda r, g: (g,), symbolic_zeros=True)


def test_aliasing_without_updates_is_a_duplicate_error():
  v = nnx.Param(jnp.array(1.0))

  @nnx.custom_vjp(nondiff_argnums=(1,), graph=True, graph_updates=False)
  def f(a, b):
    return a[...] + b[...]

  f.defvjp(lambda a, b: (f(a, b), ()), lambda b, res, g: (g,))
  with pytest.raises(errors.TransformError, match="Duplicate Param"):
    f(v, v)


def test_returned_input_without_updates_is_an_error():
  @nnx.custom_vjp(graph=False)
  def f(m):
    return m

  f.defvjp(lambda m: (f(m), ()), lambda res, g: (g,))
  with pytest.raises(errors.TransformError, match="returned input argument node #0"):
    f(Foo())


def test_fwd_must_return_a_pair():
  @nnx.custom_vjp
  def f(m):
    return sin_xy(m)

  f.defvjp(lambda m: sin_xy(m), lambda res, g: g[0])
  with pytest.raises(errors.TransformError, match=r"fwd must return an \(output, residuals\) pair"):
    nnx.grad(f)(Foo())


def test_bwd_tangent_count_and_paths_are_checked():
  @nnx.custom_vjp
  def f(m):
    return sin_xy(m)

  f.defvjp(lambda m: (sin_xy(m), ()), lambda res, g: (g[0][0], g[0][0]))
  with pytest.raises(errors.TransformError, match=r"one tangent per differentiated argument \(1"):
    nnx.grad(f)(Foo())

  f.defvjp(lambda m: (sin_xy(m), ()), lambda res, g: (nnx.State({"typo": g[1]}),))
  with pytest.raises(errors.TransformError, match="paths the arguments do not have: arg0/typo"):
    nnx.grad(f)(Foo())


def test_array_tangent_for_an_object_is_an_error():
  @nnx.custom_vjp(graph=False)
  def f(m):
    return sin_xy(m)

  f.defvjp(lambda m: (sin_xy(m), ()), lambda res, g: (g,))
  with pytest.raises(errors.TransformError, match="the tangent for the graph object"):
    nnx.grad(f, graph=False)(Foo())


def test_bound_method_refused():
  class M(nnx.Module):
    def f(self, x):
      return x

  with pytest.raises(errors.TransformError, match="does not support bound methods"):
    nnx.custom_vjp(M().f)


# --- remat without updates (used under custom_vjp) ----------------------------------------


@pytest.mark.parametrize("graph", [True, False])
def test_remat_without_updates_drops_a_static_attribute_change(graph):
  # As Flax's tree mode: only Variable values flow back; a new Variable is still an
  # error (tests/transforms/test_tx_autodiff.py).
  def f(m):
    m.calls += 1
    m.count[...] += 1
    return jnp.sum(m.x[...])

  m = Foo()
  np.testing.assert_allclose(nnx.remat(f, graph=graph, graph_updates=False)(m), 1.0)
  assert m.calls == 0 and int(m.count[...]) == 1


# --- sharded jit ------------------------------------------------------------------------


def test_inside_sharded_jit_gradients_match_and_state_stays_sharded():
  @nnx.custom_vjp
  def linear(m, x):
    m.calls[...] += 1
    return x @ m.kernel[...]

  def fwd(m, x):
    return linear(m, x), (m.kernel[...], x)

  def bwd(res, g):
    kernel, x = res
    (m_g, _), out_g = g
    m_g["kernel"][...] = x.T @ out_g     # the true gradient
    return m_g, out_g @ kernel.T

  linear.defvjp(fwd, bwd)

  class Lin(nnx.Module):
    def __init__(self):
      self.kernel = nnx.Param(jnp.arange(32.0).reshape(4, 8) / 32, logical_axes=("embed", "mlp"))
      self.calls = nnx.Variable(jnp.array(0))

  @nnx.jit
  def step(m, x):
    return nnx.grad(lambda m: jnp.sum(linear(m, x) ** 2))(m)

  @nnx.jit
  def reference(m, x):
    return nnx.grad(lambda m: jnp.sum((x @ m.kernel[...]) ** 2))(m)

  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=4, tensor=2))
  m, x = Lin(), jnp.ones((2, 4))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    g = step(m, x)
    want = reference(m, x)
  np.testing.assert_allclose(g["kernel"][...], want["kernel"][...], rtol=1e-6)
  assert g["kernel"].logical_axes == ("embed", "mlp")
  assert m.kernel.value.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert int(m.calls[...]) == 1


def test_inside_scan_over_stacked_layers():
  @nnx.custom_vjp
  def scale(m, x):
    return x * m.w[...]

  def bwd(res, g):
    w, x = res
    (m_g, _), out_g = g
    m_g["w"][...] = out_g * x
    return m_g, out_g * w

  scale.defvjp(lambda m, x: (scale(m, x), (m.w[...], x)), bwd)

  class L(nnx.Module):
    def __init__(self, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (3,)))

  @nnx.split_rngs(splits=4)
  @nnx.vmap
  def make(rngs):
    return L(rngs)

  def loss(layers, x, fn):
    @nnx.scan
    def body(x, layer):
      return fn(layer, x), None
    y, _ = body(x, layers)
    return jnp.sum(y)

  layers, x = make(nnx.Rngs(0)), jnp.array([1.0, 2.0, 3.0])
  g = nnx.grad(loss)(layers, x, scale)
  want = nnx.grad(loss)(layers, x, lambda m, x: x * m.w[...])
  assert g["w"][...].shape == (4, 3)
  np.testing.assert_allclose(g["w"][...], want["w"][...], rtol=1e-6)


def test_diff_state_nothing_differentiates_none_of_the_object():
  @nnx.custom_vjp(nondiff_argnums=(nnx.DiffState(0, False),))
  def f(m, x):
    m.count[...] += 1
    return m.x * x

  def bwd(res, g):
    (m_g, _), out_g = g
    return None, 2.0 * out_g

  f.defvjp(lambda m, x: (f(m, x), ()), bwd)
  m = Foo()
  g_m, g_x = nnx.grad(f, argnums=(0, 1))(m, jnp.array(3.0))
  np.testing.assert_allclose(g_m["x"][...], 0.0)
  np.testing.assert_allclose(g_x, 2.0)
  assert int(m.count[...]) == 1


def test_graph_mode_new_variable_inside_flows_back():
  @nnx.custom_vjp
  def f(m, x):
    m.seen = nnx.BatchStat(x * 2.0)
    return m.x * x

  f.defvjp(lambda m, x: (f(m, x), ()), lambda res, g: (None, g[1]))
  m = Foo()
  y = f(m, jnp.array(3.0))
  np.testing.assert_allclose(y, 3.0)
  np.testing.assert_allclose(m.seen[...], 6.0)
