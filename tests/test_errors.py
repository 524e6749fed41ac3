"""Tests for spmdnnx.errors: structured fields, pickling, class hierarchy."""

import pickle

import pytest

from spmdnnx import errors


def test_fields_are_attributes_and_unknown_fields_read_none():
  e = errors.CheckpointError("step 3 is missing at /tmp/x", step=3, path="/tmp/x")
  assert e.step == 3 and e.path == "/tmp/x"
  assert e.fields == {"step": 3, "path": "/tmp/x"}
  assert e.shapes is None
  assert str(e) == "step 3 is missing at /tmp/x"


def test_errors_pickle_with_fields():
  e = errors.AxisRulesError("unknown logical axis 'foo'", axes=("foo",), paths=["w"])
  back = pickle.loads(pickle.dumps(e))
  assert type(back) is errors.AxisRulesError
  assert back.axes == ("foo",) and back.paths == ["w"] and str(back) == str(e)


@pytest.mark.parametrize("cls,base", [
    (errors.DataError, ValueError), (errors.TrainingError, RuntimeError),
    (errors.LaunchError, RuntimeError), (errors.ConfigError, ValueError)])
def test_runtime_errors_are_spmdnnx_errors(cls, base):
  with pytest.raises(errors.SpmdnnxError, match="boom"):
    raise cls("boom")
  assert issubclass(cls, base)
