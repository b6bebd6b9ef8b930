"""What a run reports: each sink, the fan-out, the per-process choice, the throughput meter.

Remote work dirs (gs://) are tested in test_cloud_paths.py; a whole run's logs and profiler
trace in test_cli.py.
"""

import glob
import json
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from ukd.train import loop as train
from ukd.train import writers


def _events(logdir) -> list:
  """Every Event of the TFRecord event files under `logdir` (length, crc, data, crc)."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    at = 0
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at : at + 8])
      events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
      at += 12 + length + 4
  return events


def _scalars(logdir) -> dict:
  return {
    (e.step, v.tag): v.simple_value
    for e in _events(logdir)
    for v in e.summary.value
    if v.WhichOneof("value") == "simple_value"
  }


def test_jsonl_appends_lines_and_a_resume_drops_those_past_its_step(tmp_path):
  writer = writers.JsonlWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write_scalars(step, {"train/loss": 1.0 / step, "lr": np.float32(0.5)})
  writer.write_images(3, {"overlay/ct": np.zeros((2, 2, 3), np.uint8)})  # not a JSON sink
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train/lo')  # a line cut short by a kill
  writers.JsonlWriter(tmp_path, start_step=2).close()  # steps 3 and 4 died unsaved
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [
    {"step": 1, "train/loss": 1.0, "lr": 0.5},
    {"step": 2, "train/loss": 0.5, "lr": 0.5},
  ]


def test_tensorboard_holds_scalars_images_and_texts_at_their_steps(tmp_path):
  writer = writers.TensorBoardWriter(tmp_path)
  writer.write_texts(0, {"config": "seed: 0"})
  writer.write_scalars(1, {"train/loss": 0.25})
  writer.write_images(1, {"overlay/ct/c1": np.full((4, 6, 3), 255, np.uint8)})
  writer.close()
  logdir = tmp_path / "tensorboard"
  assert _scalars(logdir) == {(1, "train/loss"): 0.25}
  images = [(e.step, v.tag, v.image) for e in _events(logdir) for v in e.summary.value]
  (step, tag, image), *_ = [i for i in images if i[2].height]
  assert (step, tag, image.height, image.width) == (1, "overlay/ct/c1", 4, 6)
  assert any(v.tag.startswith("config") for e in _events(logdir) for v in e.summary.value)


def test_tensorboard_resume_purges_the_steps_after_it(tmp_path):
  writer = writers.TensorBoardWriter(tmp_path)
  for step in (1, 2, 3):
    writer.write_scalars(step, {"loss": float(step)})
  writer.close()
  resumed = writers.TensorBoardWriter(tmp_path, start_step=1)
  resumed.write_scalars(2, {"loss": 20.0})
  resumed.close()
  # The purge is an event that tells readers to drop steps >= 2 written before it.
  purges = [e.step for e in _events(tmp_path / "tensorboard") if e.session_log.status == 1]
  assert purges == [2]


class Recorder(writers.Writer):
  def __init__(self):
    self.calls = []

  def write_scalars(self, step, values):
    self.calls.append(("scalars", step, dict(values)))

  def write_images(self, step, images):
    self.calls.append(("images", step, sorted(images)))

  def flush(self):
    self.calls.append(("flush",))

  def close(self):
    self.calls.append(("close",))


def test_multi_writer_hands_every_call_to_each_writer_in_order():
  a, b = Recorder(), Recorder()
  multi = writers.MultiWriter([a, b])
  multi.write_scalars(3, {"x": 1.0})
  multi.write_images(3, {"overlay/ct": np.zeros((1, 1, 3), np.uint8)})
  multi.write_texts(3, {"config": "..."})  # Recorder keeps the default: ignored
  multi.flush()
  multi.close()
  expected = [("scalars", 3, {"x": 1.0}), ("images", 3, ["overlay/ct"]), ("flush",), ("close",)]
  assert a.calls == b.calls == expected


def test_console_shows_progress_and_validation_lines(capsys):
  console = writers.ConsoleWriter(20, every_seconds=0.0)
  console.write_scalars(10, {"train/loss": 0.5, "perf/steps_per_sec": 2.0})
  console.write_scalars(
    20,
    {
      "val_dice/ct/MYO": 0.6,
      "val_dice/ct/mean": 0.7,
      "val_dice/mr/mean": 0.8,
      "val_dice/mean": 0.75,
      "perf/validation_sec": 4.12,
    },
  )
  console.write_scalars(20, {"perf/checkpoint_sec": 0.3})  # not a console line
  console.close()
  assert capsys.readouterr().out.splitlines() == [
    "step 10/20  loss 0.5000  2.00 steps/s  ETA 0m05s",  # 10 steps left at 2 per second
    "step 20/20  validation mean Dice 0.750 (ct 0.700, mr 0.800) in 4.1 s",
  ]


def test_console_prints_progress_at_most_every_few_seconds_and_at_the_last_step(capsys):
  console = writers.ConsoleWriter(30, every_seconds=3600.0)
  for step in (10, 20, 30):
    console.write_scalars(step, {"train/loss": 1.0})
  assert capsys.readouterr().out.splitlines() == ["step 30/30  loss 1.0000"]


def test_other_processes_write_nothing(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  writer = writers.create(tmp_path, start_step=0, total_steps=2, main_process=False)
  assert isinstance(writer, writers.ConsoleWriter)
  writer.write_scalars(2, {"train/loss": 1.0, "val_dice/mean": 0.5})
  writer.write_images(2, {"overlay/ct": np.zeros((1, 1, 3), np.uint8)})
  writer.flush()
  writer.close()
  assert capsys.readouterr().out == "" and os.listdir(tmp_path) == []
  main = writers.create(tmp_path, start_step=0, total_steps=2, main_process=True)
  kinds = [type(w) for w in main.writers]
  assert kinds == [writers.JsonlWriter, writers.TensorBoardWriter, writers.ConsoleWriter]
  assert main.writers[2].shown
  main.close()


def test_throughput_leaves_out_the_first_interval_and_counts_both_modalities():
  times = iter([100.0, 102.0, 103.0, 104.0])
  meter = train.Throughput(examples_per_step=16, clock=lambda: next(times))  # 8 + 8 a step
  assert meter.measure(1) == {}  # step 1 compiled: only starts the clock (t = 100)
  rates = meter.measure(11)  # 10 steps in 2 s
  assert rates == {"perf/steps_per_sec": 5.0, "perf/examples_per_sec": 80.0}
  meter.restart(11)  # after a validation (t = 103)
  assert meter.measure(15) == pytest.approx(
    {"perf/steps_per_sec": 4.0, "perf/examples_per_sec": 64.0}
  )
