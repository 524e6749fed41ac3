"""Per-device temporary memory of an FSDP-sharded train step through a `Stack`.

A `Stack` of 32 residual MLP blocks (embed 512, mlp 2048, float32) is planned
on a mesh fsdp=8 with the `fsdp` rules: each stacked kernel is laid out
``P(None, 'fsdp', None)`` (the ``layers`` axis replicated, ``embed`` split).
The SGD train step (grad through the stack, update, new state out, donated)
is compiled with `jax.jit` over the split state with explicit shardings, and
``compiled.memory_analysis().temp_size_in_bytes`` (per device) is compared
with the unsharded parameter bytes. If the scan gathered the whole stack at
once the temporaries would exceed the full parameter bytes; gathering one
layer at a time leaves the sharded gradient stack (1/8) plus a few layers.
Goal with ``remat="full"``: temporaries < 25% of the parameter bytes. The
state is planned abstractly (`spmd.plan_init`), so nothing is allocated.

Run: python bench/stack_memory.py [--layers 32] [--embed 512] [--mlp 2048]
     (sets 8 fake CPU devices if none are configured)
"""

from __future__ import annotations

import argparse
import os
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import spmdnnx as nnx  # noqa: E402
from spmdnnx import spmd  # noqa: E402
from spmdnnx.nn import Linear  # noqa: E402
from spmdnnx import Stack  # noqa: E402

BATCH = 64
MiB = 2 ** 20


class Block(nnx.Module):

  def __init__(self, embed: int, mlp: int, rngs: nnx.Rngs):
    self.up = Linear(embed, mlp, kernel_axes=("embed", "mlp"), rngs=rngs)
    self.down = Linear(mlp, embed, kernel_axes=("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(x)))


def compile_step(args, remat, mesh):
  """(compiled train step, abstract state, state shardings) for one remat policy."""
  plan = spmd.plan_init(lambda: Stack(lambda r: Block(args.embed, args.mlp, r),
                                      args.layers, rngs=nnx.Rngs(0), remat=remat))
  graphdef, abstract, shardings = plan.graphdef, plan.abstract_state, plan.shardings
  x_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))

  def train_step(state, x):
    def loss(state):
      return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)

    grads = jax.grad(loss)(state)
    return jax.tree.map(lambda p, g: p - 1e-3 * g, state, grads)

  step = jax.jit(train_step, in_shardings=(shardings, x_sharding), out_shardings=shardings,
                 donate_argnums=0)
  x = jax.ShapeDtypeStruct((BATCH, args.embed), jnp.float32)
  return step.lower(abstract, x).compile(), abstract, shardings


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--embed", type=int, default=512)
  parser.add_argument("--mlp", type=int, default=2048)
  args = parser.parse_args()
  mesh = spmd.make_mesh(spmd.MeshConfig(fsdp=8))
  n = mesh.devices.size
  print(f"jax {jax.__version__} on {n} {jax.devices()[0].platform} devices, mesh fsdp={n}, "
        f"rules 'fsdp'; Stack of {args.layers} blocks (embed {args.embed}, mlp "
        f"{args.mlp}, float32), batch {BATCH}")
  rows = []
  with spmd.use_sharding(mesh, "fsdp"):
    for remat in ("full", None):
      t0 = time.perf_counter()
      compiled, abstract, shardings = compile_step(args, remat, mesh)
      seconds = time.perf_counter() - t0
      rows.append((remat, compiled.memory_analysis(), seconds))
  params = {p: v for p, v in abstract.flat_state() if isinstance(v, nnx.Param)}
  param_bytes = sum(v.value.size * v.value.dtype.itemsize for v in params.values())
  kernel = ("up", "kernel")
  spec = dict(shardings.flat_state())[("block",) + kernel].value.spec
  print(f"block/up/kernel: shape {params[('block',) + kernel].value.shape}, logical axes "
        f"{params[('block',) + kernel].logical_axes}, sharding {spec}")
  print(f"unsharded parameter bytes: {param_bytes / MiB:.1f} MiB; per-device share "
        f"(1/{n}): {param_bytes / n / MiB:.1f} MiB; one layer: "
        f"{param_bytes / args.layers / MiB:.1f} MiB")
  print(f"{'remat':>6} {'temp/device (MiB)':>18} {'temp / params':>14} {'args (MiB)':>11} "
        f"{'compile (s)':>12}")
  for remat, mem, seconds in rows:
    temp = mem.temp_size_in_bytes
    print(f"{str(remat):>6} {temp / MiB:>18.1f} {temp / param_bytes:>13.1%} "
          f"{mem.argument_size_in_bytes / MiB:>11.1f} {seconds:>12.2f}")
  ratio = rows[0][1].temp_size_in_bytes / param_bytes
  print(f"remat='full': per-device temporaries are {ratio:.1%} of the unsharded parameter "
        f"bytes (goal < 25%: {'met' if ratio < 0.25 else 'NOT met'})")


if __name__ == "__main__":
  main()
