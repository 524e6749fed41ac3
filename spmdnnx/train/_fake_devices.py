"""Fake CPU devices for machines without an accelerator.

XLA reads ``--xla_force_host_platform_device_count`` once, when JAX starts its
backends; `use_fake_devices` sets it (and selects the CPU platform) and fails
clearly if JAX has already started.
"""

from __future__ import annotations

import os
import re

import jax
from jax._src import xla_bridge

from spmdnnx import errors


def use_fake_devices(count: int) -> None:
  """Makes JAX start with ``count`` CPU devices.

  Args:
    count: number of fake devices (> 0).

  Raises:
    LaunchError: if JAX's backends are already initialised (call this before
      anything asks for devices), or ``count`` is not positive.
  """
  if count < 1:
    raise errors.LaunchError(f"--fake_devices={count}: give a positive device count.")
  if xla_bridge.backends_are_initialized():
    raise errors.LaunchError(
        f"--fake_devices={count} came too late: JAX has already started its backends. "
        "Set it before anything calls jax.devices() (launch.train does), or export "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} JAX_PLATFORMS=cpu.")
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                 os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"
  jax.config.update("jax_platforms", "cpu")  # the env var is read at import
