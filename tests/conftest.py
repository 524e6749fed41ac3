"""Test setup: 8 fake CPU devices before JAX starts, strict settings."""

import os

# Must happen before jax initialises its backend (i.e. before any jax import
# that touches devices). Keep any flags the caller already set.
_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")


def pytest_configure(config):
  # Warnings are errors. Narrow exceptions for dependencies go here, each
  # with the reason it is needed.
  config.addinivalue_line("filterwarnings", "error")
  # orbax 0.12.8: a read that fails inside orbax (the corrupted-checkpoint
  # tests) leaves asyncio tasks behind; when the garbage collector finalizes
  # them after orbax closed their event loop, Python reports "Event loop is
  # closed" as an unraisable exception, in whichever test happens to be
  # running then. Only that exact report is ignored.
  config.addinivalue_line(
      "filterwarnings",
      r"ignore:(?s)Exception ignored in.*RuntimeError. Event loop is closed"
      r":pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests expect 8 fake CPU devices"
  yield
