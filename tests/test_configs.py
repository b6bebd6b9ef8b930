import importlib

import pytest

from ukd import config as config_lib
from ukd import models


@pytest.mark.parametrize("name", ["mmwhs", "abdominal", "demo"])
def test_configs_load_validate_and_take_a_scheme(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(None)
  assert config.model.scheme == "ukd"
  config_lib.validate(config)
  models.build(config.model, config.modalities)
  assert module.get_config("scheme=joint").model.scheme == "joint"


def test_paper_settings():
  c = importlib.import_module("configs.mmwhs").get_config(None)
  assert (c.model.name, c.model.width, tuple(c.data.size), c.batch_size) == (
    "dilated2d",
    16,
    (256, 256),
    8,
  )
  assert (c.optim.lr, c.optim.decay_rate, c.optim.decay_steps) == (1e-3, 0.95, 1000)
  assert (c.loss.dice, c.loss.ce, c.loss.kd, c.loss.temperature, c.loss.l2) == (1, 1, 0.5, 2, 1e-4)
  assert c.model.dropout == 0.25 and c.data.root == config_lib.REQUIRED
  a = importlib.import_module("configs.abdominal").get_config(None)
  assert (a.model.name, tuple(a.data.patch), a.batch_size) == ("unet3d", (256, 256, 8), 2)
  assert (a.optim.lr, a.optim.decay_steps) == (1e-4, 500)


def test_parse_arg():
  assert config_lib.parse_arg("scheme=joint,runlocal") == {"scheme": "joint", "runlocal": True}
  assert config_lib.parse_arg(None) == {}


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("total_steps", 0, "config.total_steps=0"),
    ("modalities", ("ct", "ct"), "distinct"),
    ("modalities", ("ct", "pet"), "config.data.norm has no intensity normalisation for ['pet']"),
    ("eval_every", -1, "config.eval_every=-1"),
  ],
)
def test_validate_names_the_field(field, value, message):
  config = config_lib.default()
  config[field] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    config_lib.validate(config)
