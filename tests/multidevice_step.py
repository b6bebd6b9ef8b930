"""Runs two train steps on 1 device and on all (simulated) devices; prints the differences."""

import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_config, toy_batch  # noqa: E402

from ukd import models
from ukd.runtime import mesh as mesh_lib
from ukd.train import state as state_lib
from ukd.train import steps  # noqa: E402

SPATIAL = (16, 16)


def run(devices):
  config = tiny_config()
  config.model.dropout = 0.25  # dropout masks must not depend on the sharding either
  # Adam divides by sqrt(v) + eps: with the default eps a gradient of 1e-9 and one of -1e-9,
  # equal up to summation order, move a weight by +lr and -lr.  A larger eps keeps the update
  # proportional to the gradient, so the comparison sees the data-parallel computation itself.
  config.optim.eps = 1e-3
  model = models.build(config.model, config.modalities)
  mesh = mesh_lib.make_mesh(devices)
  state = state_lib.create(config, model, SPATIAL, jax.random.key(0), mesh)
  step = steps.make_train_step(model, config, mesh)
  for i in range(2):
    state, metrics = step(state, mesh_lib.to_global_batch(toy_batch(config, SPATIAL, seed=i), mesh))
  return float(metrics["loss"]), jax.device_get(state.params), jax.device_get(state.batch_stats)


def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


one = run(jax.devices()[:1])
many = run(jax.devices())
print(
  json.dumps(
    dict(
      devices=len(jax.devices()),
      loss_diff=abs(one[0] - many[0]),
      params_diff=max_diff(one[1], many[1]),
      stats_diff=max_diff(one[2], many[2]),
    )
  )
)
