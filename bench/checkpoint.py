"""Checkpoint throughput, async blocking time and restore memory vs plain orbax.

A ~200 MB train state (MLP params + AdamW mu/nu, float32) is sharded
fsdp=8 on 8 fake CPU devices. In the same process, rounds alternate (order
rotated per round):

* save: `nnx.checkpointing.CheckpointManager(async_save=False).save(model=,
  optimizer=)` vs orbax `StandardCheckpointer().save(path, tree)` + wait, on
  the same arrays (the plain tree is built before timing);
* restore: `CheckpointManager.restore` into abstract targets (`nnx.eval_shape`
  under `use_sharding`) vs `StandardCheckpointer().restore(path, abstract)`
  with the same shardings (the abstract tree is built before timing);
* async: the time `save` blocks with ``async_save=True`` (device snapshot, the
  default, and host snapshot) vs the sync save.

Peak RSS during restore is measured in fresh subprocesses (one for spmdnnx,
one for plain orbax), sampling /proc/self/status every millisecond; it is
reported against the state's bytes (on CPU the restored arrays themselves
live in host memory, so 1.0x is the floor).

Run: python bench/checkpoint.py [--rounds 5] [--embed 1024] [--mlp 4096] [--layers 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

import spmdnnx as nnx  # noqa: E402
from spmdnnx.models import MLPRegressor  # noqa: E402


def build(args, abstract=False):
  def make():
    model = MLPRegressor(64, embed=args.embed, mlp=args.mlp, num_layers=args.layers,
                         out_features=64, rngs=nnx.Rngs(0))
    return nnx.Optimizer(model, optax.adamw(1e-3))
  return nnx.eval_shape(make) if abstract else nnx.sharded_init(make)


def _nest(pairs):
  root = {}
  for path, value in pairs:
    node = root
    for k in path[:-1]:
      node = node.setdefault(str(k), {})
    node[str(path[-1])] = value
  return root


def plain_tree(optimizer):
  """The same arrays as a plain nested dict (what an orbax user saves)."""
  return _nest((p, v.value) for p, v in nnx.state(optimizer).flat_state())


def plain_abstract(target):
  """ShapeDtypeStructs with the rules' shardings, as an orbax user builds them."""
  state = nnx.state(target)
  shardings = nnx.get_named_sharding(state)
  return _nest((p, jax.ShapeDtypeStruct(v.value.shape, v.value.dtype, sharding=s.value))
               for (p, v), (_, s) in zip(state.flat_state(), shardings.flat_state()))


def nbytes(tree):
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def rss_bytes():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
  return 0


class PeakRss:
  """Samples RSS every millisecond in a thread; `peak` after the block."""

  def __enter__(self):
    self.base = rss_bytes()
    self.peak = self.base
    self._stop = False
    self._t = threading.Thread(target=self._run, daemon=True)
    self._t.start()
    return self

  def _run(self):
    while not self._stop:
      self.peak = max(self.peak, rss_bytes())
      time.sleep(0.001)

  def __exit__(self, *exc):
    self._stop = True
    self._t.join()
    self.peak = max(self.peak, rss_bytes())


def timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def rss_child(args):
  """One restore in this fresh process; prints 'peak_increase state_bytes'."""
  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=8))
  with nnx.use_sharding(mesh, "fsdp_tp"):
    target = build(args, abstract=True)
    if args.rss_child == "plain":
      ref = plain_abstract(target)
      ckptr = ocp.StandardCheckpointer()
      with PeakRss() as rss:
        out = ckptr.restore(args.dir + "/plain", ref)
        jax.block_until_ready(out)
      total = nbytes(out)
    else:
      with nnx.checkpointing.CheckpointManager(args.dir + "/nnx", async_save=False) as mngr:
        with PeakRss() as rss:
          mngr.restore(model=target.model, optimizer=target)
          jax.block_until_ready(jax.tree.leaves(nnx.state(target)))
      total = nbytes([v.value for _, v in nnx.state(target).flat_state()])
  print(rss.peak - rss.base, total)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--embed", type=int, default=1024)
  p.add_argument("--mlp", type=int, default=4096)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--rss-child", default=None)
  p.add_argument("--dir", default=None)
  args = p.parse_args()
  if args.rss_child:
    rss_child(args)
    return

  mesh = nnx.make_mesh(nnx.MeshConfig(fsdp=8))
  root = tempfile.mkdtemp(prefix="bench-ckpt-")
  with nnx.use_sharding(mesh, "fsdp_tp"):
    optimizer = build(args)
    tree = plain_tree(optimizer)
    jax.block_until_ready(tree)
    abstract = plain_abstract(build(args, abstract=True))
    state_bytes = nbytes(tree)
    print(f"state: {state_bytes / 2**20:.1f} MiB over {len(jax.tree.leaves(tree))} arrays, "
          f"fsdp=8 on {jax.device_count()} devices")
    save = {"nnx": [], "plain": [], "async-device": [], "async-host": []}
    restore = {"nnx": [], "plain": []}
    for r in range(args.rounds):
      d = os.path.join(root, str(r))

      def nnx_save():
        with nnx.checkpointing.CheckpointManager(d + "/nnx", async_save=False) as mngr:
          mngr.save(1, model=optimizer.model, optimizer=optimizer)

      def plain_save():
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(d + "/plain", tree)
        ckptr.wait_until_finished()
        ckptr.close()

      def async_save(snapshot):
        mngr = nnx.checkpointing.CheckpointManager(d + "/async-" + snapshot,
                                                   snapshot=snapshot)
        save["async-" + snapshot].append(timed(lambda: mngr.save(
            1, model=optimizer.model, optimizer=optimizer)))
        mngr.close()

      def nnx_restore():
        target = build(args, abstract=True)
        with nnx.checkpointing.CheckpointManager(d + "/nnx", async_save=False) as mngr:
          restore["nnx"].append(timed(lambda: (
              mngr.restore(model=target.model, optimizer=target),
              jax.block_until_ready([v.value for _, v in nnx.state(target).flat_state()]))))

      def plain_restore():
        ckptr = ocp.StandardCheckpointer()
        restore["plain"].append(timed(lambda: jax.block_until_ready(
            ckptr.restore(d + "/plain", abstract))))
        ckptr.close()

      order = [("nnx", nnx_save), ("plain", plain_save)]
      if r % 2:
        order.reverse()
      for name, fn in order:
        save[name].append(timed(fn))
      async_save("device")
      async_save("host")
      order = [nnx_restore, plain_restore]
      if r % 2:
        order.reverse()
      for fn in order:
        fn()
      if r < args.rounds - 1:
        shutil.rmtree(d)
    last = os.path.join(root, str(args.rounds - 1))

  med = {k: statistics.median(v) for k, v in save.items()}
  rmed = {k: statistics.median(v) for k, v in restore.items()}
  mib = state_bytes / 2**20
  print(f"save    spmdnnx {med['nnx']:.3f}s ({mib / med['nnx']:.0f} MiB/s)  plain orbax "
        f"{med['plain']:.3f}s  throughput ratio (spmdnnx/orbax) {med['plain'] / med['nnx']:.3f}")
  print(f"restore spmdnnx {rmed['nnx']:.3f}s ({mib / rmed['nnx']:.0f} MiB/s)  plain orbax "
        f"{rmed['plain']:.3f}s  throughput ratio (spmdnnx/orbax) "
        f"{rmed['plain'] / rmed['nnx']:.3f}")
  for snapshot in ("device", "host"):
    t = med["async-" + snapshot]
    print(f"async save (snapshot={snapshot!r}) blocks {t:.3f}s = {t / med['nnx']:.3f} of the "
          "sync save time")
  for kind in ("nnx", "plain"):
    out = subprocess.run([sys.executable, __file__, "--rss-child", kind, "--dir", last,
                          "--embed", str(args.embed), "--mlp", str(args.mlp),
                          "--layers", str(args.layers)],
                         capture_output=True, text=True, check=True)
    inc, total = map(int, out.stdout.split()[-2:])
    print(f"restore peak RSS increase ({'spmdnnx' if kind == 'nnx' else 'plain orbax'}): "
          f"{inc / 2**20:.1f} MiB = {inc / total:.2f}x the restored state's bytes")
  shutil.rmtree(root)


if __name__ == "__main__":
  main()
