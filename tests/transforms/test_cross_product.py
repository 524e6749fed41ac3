"""Every stateful piece under every lifted transform (issue 3's cross-product).

Pieces: a Variable counter update, a BatchNorm-style running statistic, an
Rngs-driven dropout-like mask that must advance, and a shared reference (one
submodule reachable twice). Transforms: jit, grad, vmap, scan, remat, cond.

Each case runs the piece through the transform on one model and the same
calls eagerly on a clone, then compares the whole state (values, types,
metadata) and checks that shared references are still shared.
"""

import functools

import jax
import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from tx_models import Count, close

D = 4


# --- pieces ----------------------------------------------------------------------------


class CounterPiece(nnx.Module):

  def __init__(self):
    self.count = Count(jnp.array(0))
    self.w = nnx.Param(jnp.linspace(0.5, 2.0, D), logical_axes=("mlp",))

  def __call__(self, x, axis_name=None):
    self.count += 1
    return x * self.w.value


class StatPiece(nnx.Module):
  """BatchNorm-style: running mean of the input, synced over `axis_name`."""

  def __init__(self):
    self.scale = nnx.Param(jnp.ones(D), logical_axes=("mlp",))
    self.mean = nnx.BatchStat(jnp.zeros(D), logical_axes=("mlp",))
    self.steps = Count(jnp.array(0))

  def __call__(self, x, axis_name=None):
    batch_mean = x.mean(axis=0)
    if axis_name is not None:
      batch_mean = jax.lax.pmean(batch_mean, axis_name)
    self.mean.value = 0.9 * self.mean.value + 0.1 * batch_mean
    self.steps += 1
    return (x - self.mean.value) * self.scale.value


class DropPiece(nnx.Module):
  """Dropout-like: a fresh key from the Rngs on every call."""

  def __init__(self):
    self.rngs = nnx.Rngs(dropout=7)
    self.w = nnx.Param(jnp.ones(D), logical_axes=("mlp",))

  def __call__(self, x, axis_name=None):
    keep = jax.random.bernoulli(self.rngs.dropout(), 0.5, x.shape)
    return jnp.where(keep, 2.0 * x * self.w.value, jnp.zeros_like(x))


class Inner(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.arange(1.0, D + 1.0), logical_axes=("mlp",))
    self.uses = Count(jnp.array(0))


class SharedPiece(nnx.Module):
  """The same Inner reachable as `.a` and `.b`; updates through one are seen by both."""

  def __init__(self):
    inner = Inner()
    self.a = inner
    self.b = inner

  def __call__(self, x, axis_name=None):
    self.a.uses += 1
    self.b.uses += 1
    return x * self.a.w.value + self.b.w.value


PIECES = {"counter": CounterPiece, "batchstat": StatPiece, "dropout": DropPiece,
          "shared": SharedPiece}


def apply(m, x, axis_name=None):
  return m(x, axis_name=axis_name)


def identity(m, x):
  return x


# --- transforms: (transformed run, eager reference) ---------------------------------


def xs_steps():
  return jnp.linspace(-1.0, 2.0, 3 * 2 * D).reshape(3, 2, D)


def run_jit(m, xs):
  f = nnx.jit(apply)
  return [f(m, x) for x in xs[:2]]


def ref_jit(m, xs):
  return [apply(m, x) for x in xs[:2]]


def run_grad(m, xs):
  g = nnx.grad(lambda m, x: apply(m, x).sum())(m, xs[0])
  assert isinstance(g, nnx.State)
  return None


def ref_grad(m, xs):
  apply(m, xs[0])
  return None


def run_vmap(m, xs):
  # Broadcast the model; the batch statistic is synchronised over the mapped axis.
  return nnx.vmap(functools.partial(apply, axis_name="i"), in_axes=(None, 0),
                  axis_name="i")(m, xs)


def ref_vmap(m, xs):
  apply(m, xs.reshape(-1, D))  # one update, from the whole batch
  return None


def run_scan(m, xs):
  return nnx.scan(apply, in_axes=(None, 0), out_axes=0)(m, xs)


def ref_scan(m, xs):
  return jnp.stack([apply(m, x) for x in xs])


def run_remat(m, xs):
  f = nnx.remat(apply, policy="save_dots")
  out = f(m, xs[0])
  nnx.grad(lambda m, x: f(m, x).sum())(m, xs[1])
  return out


def ref_remat(m, xs):
  out = apply(m, xs[0])
  apply(m, xs[1])
  return out


def run_cond(m, xs):
  taken = nnx.cond(jnp.array(True), apply, identity, m, xs[0])
  skipped = nnx.cond(jnp.array(False), apply, identity, m, xs[1])
  return [taken, skipped]


def ref_cond(m, xs):
  return [apply(m, xs[0]), xs[1]]


TRANSFORMS = {"jit": (run_jit, ref_jit), "grad": (run_grad, ref_grad),
              "vmap": (run_vmap, ref_vmap), "scan": (run_scan, ref_scan),
              "remat": (run_remat, ref_remat), "cond": (run_cond, ref_cond)}


# --- checks ----------------------------------------------------------------------------


def flat_state(m):
  out = {}
  for path, v in nnx.state(m).flat_state():
    value = v.value if isinstance(v, nnx.Variable) else v
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    meta = v.get_metadata() if isinstance(v, nnx.Variable) else {}
    out[tuple(path)] = (type(v), value, meta)
  return out


def assert_same_state(m, ref):
  got, want = flat_state(m), flat_state(ref)
  assert got.keys() == want.keys()
  for path in want:
    t1, v1, m1 = got[path]
    t2, v2, m2 = want[path]
    assert t1 is t2, path
    assert v1.shape == v2.shape and v1.dtype == v2.dtype, path
    assert close(v1, v2), (path, v1, v2)
    assert m1 == m2, path


def check_piece_invariants(name, m, before):
  """Piece-specific facts that must hold after the transform ran."""
  if name == "counter":
    assert int(m.count.value) > 0
  elif name == "batchstat":
    assert not close(m.mean.value, before.mean.value)
    assert m.mean.logical_axes == ("mlp",)
  elif name == "dropout":
    assert int(m.rngs.dropout.count.value) > int(before.rngs.dropout.count.value)
  elif name == "shared":
    assert m.a is m.b
    assert int(m.a.uses.value) > 0 and int(m.a.uses.value) % 2 == 0


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("piece", list(PIECES))
def test_state_after_transform_matches_eager(piece, transform):
  run, ref_run = TRANSFORMS[transform]
  m = PIECES[piece]()
  ref = nnx.clone(m)
  before = nnx.clone(m)
  xs = xs_steps()
  out = run(m, xs)
  ref_out = ref_run(ref, xs)
  assert_same_state(m, ref)
  check_piece_invariants(piece, m, before)
  if ref_out is not None:
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
      assert close(a, b)
  if piece == "shared":
    assert ref.a is ref.b


@pytest.mark.parametrize("transform", [t for t in TRANSFORMS if t != "grad"])
def test_dropout_mask_advances_between_calls(transform):
  """Two calls draw different masks (grad returns no mask; its counter is checked above)."""
  run, _ = TRANSFORMS[transform]
  m = DropPiece()
  xs = jnp.ones((3, 2, D))
  first = jnp.stack(jax.tree.leaves(run(m, xs)))
  second = jnp.stack(jax.tree.leaves(run(m, xs)))
  assert bool((first != second).any())


def test_scan_dropout_mask_differs_per_step():
  m = DropPiece()
  masks = run_scan(m, jnp.ones((3, 8, D))) != 0
  assert bool((masks[0] != masks[1]).any()) and bool((masks[1] != masks[2]).any())
  assert int(m.rngs.dropout.count.value) == 3


def test_shared_reference_gradient_accumulates_both_uses():
  m = SharedPiece()
  x = jnp.ones((2, D))
  for wrap in (lambda f: f, nnx.jit, nnx.remat):
    g = wrap(nnx.grad(lambda m, x: apply(m, x).sum()))(m, x)
    # d/dw sum(x * w + w) = sum over rows of (x + 1) = 4 per entry.
    assert close(g["a"]["w"].value, jnp.full((D,), 4.0))
    assert m.a is m.b


def test_shared_reference_across_two_arguments():
  shared = Inner()

  class Holder(nnx.Module):
    def __init__(self, inner):
      self.inner = inner

  h1, h2 = Holder(shared), Holder(shared)

  def bump(h1, h2, x):
    h1.inner.uses += 1
    return x * h2.inner.w.value + h2.inner.uses.value

  for transform in (nnx.jit, nnx.remat):
    transform(bump)(h1, h2, jnp.ones(D))
  nnx.cond(True, bump, lambda h1, h2, x: x, h1, h2, jnp.ones(D))
  nnx.vmap(bump, in_axes=(None, None, 0))(h1, h2, jnp.ones((3, D)))
  nnx.scan(bump, in_axes=(None, None, 0), out_axes=0)(h1, h2, jnp.ones((3, D)))
  assert h1.inner is h2.inner is shared
  assert int(shared.uses.value) == 2 + 1 + 1 + 3
