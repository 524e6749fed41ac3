"""Tree-mode aliasing check shared by the lifted transforms."""

import pytest

import spmdnnx as nnx
from spmdnnx import errors
from spmdnnx._transforms import lift


def _model():
  return nnx.Linear(2, 3, rngs=nnx.Rngs(0))


def test_graph_mode_allows_shared_references():
  m = _model()
  ex = lift.extract(((m, m), {"again": m.kernel}))
  assert len(ex.nodes) == 2


def test_node_passed_twice_is_refused_in_tree_mode():
  m = _model()
  with pytest.raises(errors.TransformError, match=r"(?s)nnx.jit with graph=False.*passed twice"):
    lift.extract((m, m), aliasing=False, who="jit")


def test_variable_shared_inside_is_refused_with_both_paths():
  m = _model()
  m.alias = m.kernel
  with pytest.raises(errors.TransformError, match=r"Duplicate Param found at paths:\n  - 0/(alias|kernel)\n  - 0/(kernel|alias)\n") as e:
    lift.extract((m,), aliasing=False, who="vmap")
  assert len(e.value.paths) == 2


def test_unshared_arguments_pass_in_tree_mode():
  a, b = _model(), _model()
  ex = lift.extract((a, b), aliasing=False)
  assert len(ex.leaves) == 4
