"""Compiling the real train step of a layout on N fake CPU devices.

`compile_layout` runs in a process that has the layout's device count: it
validates the layout's config with the runtime's `validate`, builds the mesh
with `make_mesh`, the model and optimizer abstractly (`abstract_state`: no
array is allocated) and lowers and compiles the train step of
`make_train_step` on them, the very function `spmdnnx.train.run` calls. It
reports XLA's per-device memory (`memory_analysis`), the collectives and dot
FLOPs of the compiled HLO (`analyze_hlo`) and XLA's own FLOP count.

`compile_in_subprocess` runs it for many layouts in a child process started
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (JAX reads the
device count once, at start-up) and yields one result per layout as it
finishes; a child that dies (XLA aborts on some programs) is restarted for
the remaining layouts and the layout it was compiling reports the failure.
Run this module as a program to be that child (JSON on stdin, one JSON line
per layout on stdout).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from spmdnnx import errors
from spmdnnx.spmd._context import use_sharding
from spmdnnx.spmd._mesh import make_mesh
from spmdnnx.train import _config
from spmdnnx.train import _hlo
from spmdnnx.train import _plan_layouts as layouts_lib
from spmdnnx.train import _step

_RESULT_PREFIX = "PLAN-RESULT "
_FAST_CODEGEN = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def lower_train_step(cfg: Any, layout: layouts_lib.Layout, mesh: Any) -> Any:
  """`jax.stages.Lowered` of the runtime's train step for ``layout`` on ``mesh``.

  ``mesh`` holds every device of the layout (one process).
  """
  flat = layout.config(cfg, flat=True)
  plan = _config.validate(flat, num_devices=mesh.devices.size, process_count=1)
  with use_sharding(mesh, plan.rules):
    optimizer = layouts_lib.abstract_state(plan.model, flat)
    step = _step.make_train_step(microbatches=flat.microbatches, z_loss=flat.z_loss)
    spec = layouts_lib.batch_spec(plan.rules, flat, plan.mesh_shape)
    token = jax.ShapeDtypeStruct((flat.batch_size, flat.seq_len), jnp.int32,
                                 sharding=NamedSharding(mesh, spec))
    return step.lower(optimizer.model, optimizer, {"inputs": token, "targets": token})


def compile_layout(cfg: Any, layout: layouts_lib.Layout) -> dict:
  """Compiles the train step of ``layout`` on this process's devices.

  Returns:
    ``{"compile_s", "argument_bytes", "output_bytes", "temp_bytes",
    "alias_bytes", "xla_flops", "hlo": HloStats dict}`` per device.
  """
  t0 = time.perf_counter()
  flat = layout.config(cfg, flat=True)
  plan = _config.validate(flat, num_devices=jax.device_count(), process_count=1)
  mesh = make_mesh(plan.mesh_config)
  compiled = lower_train_step(cfg, layout, mesh).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  stats = _hlo.analyze_hlo(compiled.as_text(), num_devices=mesh.devices.size,
                           host_of=layouts_lib.device_of_host(layout))
  return {"compile_s": seconds,
          "argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "alias_bytes": int(mem.alias_size_in_bytes),
          "xla_flops": _hlo.cost_flops(compiled),
          "hlo": stats.to_dict()}


def _layout_json(layout: layouts_lib.Layout) -> dict:
  return {"ici": layout.ici, "dcn": layout.dcn, "microbatches": layout.microbatches,
          "remat": layout.remat}


def _layout_of(data: dict) -> layouts_lib.Layout:
  return layouts_lib.Layout(tuple(data["ici"]), tuple(data["dcn"]), int(data["microbatches"]),
                            str(data["remat"]))


def main() -> None:
  """Child process: compiles every layout of the JSON job on stdin."""
  job = json.load(sys.stdin)
  cfg = ml_collections.ConfigDict(job["config"])
  for index, data in job["layouts"]:
    print(f"{_RESULT_PREFIX}{json.dumps({'index': index, 'started': True})}", flush=True)
    try:
      result = compile_layout(cfg, _layout_of(data))
    except (errors.SpmdnnxError, RuntimeError, ValueError, TypeError) as e:
      # Reported for this layout (XLA's own errors are RuntimeErrors); the
      # child goes on with the next one.
      result = {"error": f"{type(e).__name__}: {e}"}
    result["index"] = index
    print(f"{_RESULT_PREFIX}{json.dumps(result)}", flush=True)
    jax.clear_caches()


def _child_env(devices: int) -> dict:
  env = dict(os.environ)
  flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                   if not f.startswith("--xla_force_host_platform_device_count"))
  # The LLVM flags only speed up code generation (~1.5x on a 70B step): the
  # partitioned HLO and the buffer sizes the planner reads are made before it.
  env["XLA_FLAGS"] = (f"{flags} --xla_force_host_platform_device_count={devices} "
                      f"{_FAST_CODEGEN}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
  return env


def compile_in_subprocess(cfg: Any, layouts: Sequence[layouts_lib.Layout], devices: int,
                          *, workers: int = 1,
                          on_start: Callable[[int], None] | None = None
                          ) -> Iterator[tuple[int, dict]]:
  """Yields ``(index into layouts, result)`` as children compile the layouts.

  Args:
    cfg: the run config.
    layouts: the layouts to compile.
    devices: fake CPU devices of each child.
    workers: child processes compiling at once (each takes every
      ``workers``-th layout).
    on_start: called with a layout's index when a child starts on it.
  """
  workers = max(1, min(workers, len(layouts)))
  if workers == 1:
    yield from _compile_serially(cfg, layouts, list(range(len(layouts))), devices, on_start)
    return
  results: queue.Queue = queue.Queue()

  def work(indices: list[int]) -> None:
    try:
      for item in _compile_serially(cfg, layouts, indices, devices, on_start):
        results.put(item)
    except errors.SpmdnnxError as e:  # handed to the caller's thread
      results.put(e)
    finally:
      results.put(None)

  threads = [threading.Thread(target=work, args=(list(range(w, len(layouts), workers)),),
                              daemon=True) for w in range(workers)]
  for t in threads:
    t.start()
  running = len(threads)
  while running:
    item = results.get()
    if item is None:
      running -= 1
    elif isinstance(item, Exception):
      raise item
    else:
      yield item


def _compile_serially(cfg: Any, layouts: Sequence[layouts_lib.Layout],
                      indices: list[int], devices: int,
                      on_start: Callable[[int], None] | None = None
                          ) -> Iterator[tuple[int, dict]]:
  """One child after another compiles ``layouts[i]`` for ``i`` in ``indices``."""
  config = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  pending = list(indices)
  while pending:
    job = {"config": config, "layouts": [(i, _layout_json(layouts[i])) for i in pending]}
    with tempfile.TemporaryFile("w+") as stderr, subprocess.Popen(
        [sys.executable, "-m", "spmdnnx.train._plan_compile"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=_child_env(devices)) as child:
      try:
        try:
          child.stdin.write(json.dumps(job))
          child.stdin.close()
        except BrokenPipeError:  # the child died before reading its job: told below
          try:
            child.stdin.close()
          except BrokenPipeError:
            pass
        current = None
        for line in child.stdout:
          if not line.startswith(_RESULT_PREFIX):
            continue
          result = json.loads(line[len(_RESULT_PREFIX):])
          index = result.pop("index")
          if result.pop("started", False):
            current = index
            if on_start is not None:
              on_start(index)
            continue
          pending.remove(index)
          current = None
          yield index, result
        child.wait()
      finally:
        if child.poll() is None:  # the caller stopped early
          child.kill()
          child.wait()
      stderr.seek(0)
      tail = stderr.read()[-2000:].strip()
      if current is not None:
        pending.remove(current)
        yield current, {"error": f"the compile process died (exit code {child.returncode}) "
                                 f"on this layout: {tail or 'no output'}"}
      elif pending:
        raise errors.LaunchError(
            f"The planner's compile process exited (code {child.returncode}) before "
            f"compiling anything: {tail or 'no output'}", returncode=child.returncode)


if __name__ == "__main__":
  main()
