"""Throughput, MFU, the progress line and the metric files."""

import glob
import json
import os

import pytest

from spmdnnx import train


def test_throughput_and_mfu():
  t = train.Throughput(tokens_per_step=4096, flops_per_token=1e9, num_devices=4, peak=1e15)
  m = t.of(0.5)
  assert m["tokens_per_s"] == pytest.approx(8192)
  assert m["tokens_per_s_per_device"] == pytest.approx(2048)
  assert m["tflops_per_device"] == pytest.approx(2048 * 1e9 / 1e12)
  assert m["mfu"] == pytest.approx(2048 * 1e9 / 1e15)


@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5p", 459),
    ("TPU v6 lite", 918)])
def test_peak_table(kind, tflops):
  assert train.peak_flops_per_device(kind) == tflops * 1e12


def test_cpu_has_no_peak():
  assert train.peak_flops_per_device() is None  # the test devices are CPUs
  assert train.peak_flops_per_device("AMD EPYC") is None


def test_progress_line_shows_every_quantity():
  m = {"step": 5, "loss": 2.5, "learning_rate": 1e-3, "grad_norm": 0.5, "step_time_s": 0.02}
  m.update(train.Throughput(1000, 1e6, 8, None).of(0.02))
  line = train.progress_line(m, total_steps=100, eta_s=125)
  for part in ("step   5/100", "loss 2.5000", "lr 1.00e-03", "gnorm 0.500", "20.0 ms/step",
               "50,000 tok/s", "6,250 tok/s/dev", "TFLOP/s/dev", "MFU n/a", "ETA 2:05"):
    assert part in line, (part, line)


def test_writer_writes_jsonl_and_tensorboard(tmp_path):
  lines = []
  w = train.MetricsWriter(str(tmp_path), log=lines.append)
  w.write({"step": 1, "loss": 2.0, "mfu": None, "grad_norm": float("nan")})
  w.text("hello")
  w.close()
  with open(tmp_path / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  assert records == [{"step": 1, "loss": 2.0, "mfu": None, "grad_norm": None}]
  assert lines == ["hello"]
  assert glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))


def test_writer_of_other_processes_writes_nothing(tmp_path):
  lines = []
  w = train.MetricsWriter(str(tmp_path / "w"), enabled=False, log=lines.append)
  w.write({"step": 1, "loss": 2.0})
  w.text("x")
  w.close()
  assert not (tmp_path / "w").exists() and not lines
