"""Train the default model on a sharded mesh.

Example (8 fake CPU devices, FSDP x tensor parallel):

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m launch.train \
      --mesh=fsdp=4,tensor=2 --rules=fsdp_tp --steps=100
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
import jax
import optax

import spmdnnx as nnx
from spmdnnx.train import MLPRegressor, SyntheticRegression, train
from spmdnnx.train.models import mse

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 100, "Optimizer updates to run.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("in_features", 16, "Input features of the synthetic data.")
flags.DEFINE_integer("out_features", 4, "Targets of the synthetic data.")
flags.DEFINE_integer("embed", 64, "Model width.")
flags.DEFINE_integer("mlp", 256, "Hidden width of each MLP block.")
flags.DEFINE_integer("num_layers", 4, "Residual MLP blocks.")
flags.DEFINE_float("learning_rate", 3e-3, "AdamW learning rate.")
flags.DEFINE_float("weight_decay", 1e-4, "AdamW weight decay.")
flags.DEFINE_integer("seed", 0, "Seed for parameters and data.")
flags.DEFINE_integer("log_every", 10, "Log the loss every N steps.")
flags.DEFINE_string("mesh", "fsdp=-1,tensor=2",
                    "Parallelism degrees within a process, e.g. 'data=2,fsdp=2,tensor=2'; "
                    "-1 fills the remaining devices.")
flags.DEFINE_string("rules", "fsdp_tp", "Axis-rule preset in configs/rules (or a JSON path).")
flags.DEFINE_bool("report", True, "Print the sharding report of the trained state.")


def parse_degrees(text: str) -> dict[str, int]:
  """'fsdp=4,tensor=2' -> {'fsdp': 4, 'tensor': 2}."""
  degrees = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if not value:
      raise app.UsageError(f"--mesh entry {part!r} must look like name=degree")
    degrees[name.strip()] = int(value)
  return degrees


def main(argv):
  del argv
  mesh = nnx.make_mesh(nnx.MeshConfig(ici=parse_degrees(FLAGS.mesh)))
  print(f"devices: {jax.device_count()} ({jax.default_backend()}), mesh: "
        f"{dict(mesh.shape)}, rules: {FLAGS.rules}")
  with nnx.use_sharding(mesh, FLAGS.rules):
    model = nnx.sharded_init(lambda: MLPRegressor(
        FLAGS.in_features, embed=FLAGS.embed, mlp=FLAGS.mlp, num_layers=FLAGS.num_layers,
        out_features=FLAGS.out_features, rngs=nnx.Rngs(FLAGS.seed)))
    optimizer = nnx.Optimizer(model, optax.adamw(FLAGS.learning_rate,
                                                 weight_decay=FLAGS.weight_decay))
    data = SyntheticRegression(FLAGS.in_features, FLAGS.out_features, FLAGS.batch_size,
                               seed=FLAGS.seed)
    result = train(model, optimizer, data, steps=FLAGS.steps, log_every=FLAGS.log_every,
                   loss_fn=lambda m, x, y: mse(m(x), y))
    if FLAGS.report:
      print(nnx.sharding_report(model))
      totals = nnx.sharding_report(optimizer).totals()["per_device"]
      print("per device with optimizer state: " +
            ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in totals.items()))
  print(f"loss {result.first_loss:.5f} -> {result.last_loss:.5f}; "
        f"{result.seconds_per_step * 1e3:.2f} ms/step")
  if not result.last_loss < result.first_loss:
    print("error: the loss did not decrease", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
