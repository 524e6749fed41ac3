"""The import direction of docs/architecture.md's layering table, checked on the source.

Each module of the package belongs to one layer; a module may import modules of its own
layer or of layers above it in the table, never below. Tools (launch/, bench/) use only the
public API. A new module must be added to LAYERS, which keeps the table honest.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spmdnnx"

#: layer name -> module-name prefixes (dotted, relative to spmdnnx), in table order.
LAYERS = [
    ("base", ["errors", "_typing", "_tracectx", "_modes"]),
    ("values", ["_filters", "_eager", "_variables", "_stacked"]),
    ("objects", ["_pytree", "_object", "_state", "_rngs"]),
    ("graph", ["_graphdef", "_graph_tree", "_graph", "_graph_api", "_restructure",
               "_graph_context", "_module", "_display"]),
    ("spmd", ["spmd"]),
    ("transforms", ["_transforms",
                    "extract"]),
    ("library", [
        "nn", "_optim", "_stack", "_stack_convert",
        "_metrics", "metrics", "_train_state", "_tabulate",
        "_pipeline",
        "_abstract",
        "_compat",
    ]),
    ("models", ["models"]),
    ("checkpointing", ["checkpointing"]),
    ("train", ["train"]),
]


def layer_of(module: str) -> int:
  """Index of the layer that owns `module` (dotted name below spmdnnx)."""
  for i, (_, prefixes) in enumerate(LAYERS):
    for p in prefixes:
      if module == p or module.startswith(p + "."):
        return i
  raise KeyError(module)


def package_modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    if not parts or parts == ["__main__"]:
      continue
    if parts[-1] == "__main__":
      parts = parts[:-1]
    yield ".".join(parts), path


def imported_spmdnnx_modules(path: pathlib.Path):
  """Dotted names below spmdnnx that `path` imports (module-level or not)."""
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("spmdnnx."):
          yield alias.name[len("spmdnnx."):], node.lineno
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "spmdnnx":
        for alias in node.names:
          yield alias.name, node.lineno
      elif node.module.startswith("spmdnnx."):
        yield node.module[len("spmdnnx."):], node.lineno


def test_every_module_has_a_layer():
  missing = []
  for name, _ in package_modules():
    try:
      layer_of(name)
    except KeyError:
      missing.append(name)
  assert not missing, f"add these modules to LAYERS and docs/architecture.md: {missing}"


def test_imports_point_up_the_table():
  upward = []
  for name, path in package_modules():
    mine = layer_of(name)
    for target, line in imported_spmdnnx_modules(path):
      try:
        theirs = layer_of(target)
      except KeyError:
        continue  # a public name re-exported by spmdnnx/__init__ (e.g. `from spmdnnx import errors`)
      if theirs > mine:
        upward.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[mine][0]}) imports "
                      f"spmdnnx.{target} ({LAYERS[theirs][0]})")
  assert not upward, "imports against the layering table:\n" + "\n".join(upward)


@pytest.mark.parametrize("tool", ["launch", "bench"])
def test_tools_use_only_the_public_api(tool):
  private = []
  for path in sorted((ROOT / tool).rglob("*.py")):
    for target, line in imported_spmdnnx_modules(path):
      if any(part.startswith("_") for part in target.split(".")):
        private.append(f"{path.relative_to(ROOT)}:{line} imports spmdnnx.{target}")
  assert not private, "tools must use the public API only:\n" + "\n".join(private)


def test_layer_table_names_every_layer():
  text = (ROOT / "docs" / "architecture.md").read_text()
  for layer, _ in LAYERS:
    assert f"| {layer} |" in text, f"docs/architecture.md's table has no row for {layer!r}"


def test_runtime_namespaces_are_imported_on_first_use():
  import subprocess
  import sys
  code = ("import sys, spmdnnx as nnx\n"
          "heavy = [m for m in ('orbax.checkpoint', 'grain', 'tensorboardX') if m in sys.modules]\n"
          "assert not heavy, heavy\n"
          "assert nnx.checkpointing.CheckpointManager and nnx.train.run\n"
          "assert 'orbax.checkpoint' in sys.modules and 'grain' in sys.modules\n"
          "assert {'checkpointing', 'train'} <= set(dir(nnx))\n")
  env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
