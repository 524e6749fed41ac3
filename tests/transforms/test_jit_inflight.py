"""nnx.jit bounds its executions in flight on the multi-device CPU backend."""

import doctest
import importlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx._transforms import jit_inflight


@pytest.fixture
def restore_bound():
  old = nnx.set_max_in_flight(nnx.get_max_in_flight())
  yield
  nnx.set_max_in_flight(old)


def test_pending_executions_never_exceed_the_bound(restore_bound):
  nnx.set_max_in_flight(2)
  f = nnx.jit(lambda x: x + 1)
  x = jnp.zeros(4)
  for _ in range(6):
    x = f(x)
    assert len(jit_inflight.STATE.pending) <= 2
  assert float(x[0]) == 6.0


def test_per_jit_bound_overrides_the_global_one(restore_bound):
  nnx.set_max_in_flight(4)
  f = nnx.jit(lambda x: x * 2, max_in_flight=1)
  x = jnp.ones(2)
  for _ in range(3):
    x = f(x)
    assert len(jit_inflight.STATE.pending) <= 1


def test_zero_means_unbounded(restore_bound):
  nnx.set_max_in_flight(0)
  jit_inflight.STATE.pending.clear()
  f = nnx.jit(lambda x: x - 1)
  for _ in range(3):
    f(jnp.ones(2))
  assert len(jit_inflight.STATE.pending) == 0   # nothing tracked, nothing waited on


def test_donated_samples_are_skipped(restore_bound):
  # State-only steps: the sample is a state array the next step donates.
  nnx.set_max_in_flight(1)
  c = nnx.Module()
  c.n = nnx.Variable(jnp.zeros(3))
  step = nnx.jit(lambda c: setattr(c, "n", c.n + 1), donate_state=True)
  for _ in range(4):
    step(c)
  assert float(c.n.value[0]) == 4.0


def test_bad_bounds_are_errors(restore_bound):
  with pytest.raises(errors.ConfigError, match=r"max_in_flight must be a non-negative integer "
                     r"\(0 or None: unbounded\), got -1"):
    nnx.set_max_in_flight(-1)
  with pytest.raises(errors.ConfigError, match=r"max_in_flight must be a non-negative integer.*"
                     r"got 'two'"):
    nnx.jit(lambda x: x, max_in_flight="two")
  assert nnx.set_max_in_flight(None) >= 0
  assert nnx.get_max_in_flight() == 0


def _run(code: str, env_extra: dict) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.update(env_extra)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=root,
                        capture_output=True, text=True, timeout=600)


def test_environment_variable_sets_the_default():
  out = _run("import spmdnnx as nnx; print(nnx.get_max_in_flight())",
             {"SPMDNNX_MAX_IN_FLIGHT": "3"})
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "3"
  bad = _run("import spmdnnx", {"SPMDNNX_MAX_IN_FLIGHT": "many"})
  assert bad.returncode != 0
  assert "SPMDNNX_MAX_IN_FLIGHT must be a non-negative integer" in bad.stderr


LOOP = """
import jax, jax.numpy as jnp, optax
import spmdnnx as nnx

mesh = nnx.make_mesh(nnx.MeshConfig(data=8))
model = nnx.Linear(4, 4, kernel_axes=("embed", "mlp"), rngs=nnx.Rngs(0))
opt = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)

@nnx.jit
def step(model, opt, x, y):
  def loss_fn(m):
    return jnp.mean((m(x) - y) ** 2)   # a mean over the data-sharded batch: all-reduce
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  opt.update(model, grads)
  return loss

with nnx.use_sharding(mesh, "dp"):
  x = nnx.shard_batch(jnp.ones((16, 4)))
  y = nnx.shard_batch(jnp.zeros((16, 4)))
  losses = [step(model, opt, x, y) for _ in range(1000)]   # never blocks itself
  print("final", float(losses[-1]) < float(losses[0]))
"""


@pytest.mark.slow
def test_long_data_parallel_loop_does_not_abort():
  out = _run(LOOP, {})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "final True" in out.stdout


@pytest.mark.parametrize("name", ["spmdnnx._transforms.jit_inflight",
                                  "spmdnnx._transforms.jit_plan"])
def test_docstring_examples(name, restore_bound):
  module = importlib.import_module(name)
  with jax.numpy_dtype_promotion("standard"):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0
