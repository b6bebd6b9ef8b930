import importlib
import subprocess
import sys

import pytest

from ukd import config as config_lib
from ukd import models
from ukd.errors import ConfigError


@pytest.mark.parametrize("name", ["mmwhs", "abdominal", "amos", "demo"])
def test_configs_load_validate_and_take_a_scheme(name):
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(None)
  assert config.model.scheme == "ukd"
  config_lib.check(config)
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


def test_parse_arg_types_and_defaults():
  parse = lambda arg: config_lib.parse_arg(arg, scheme="ukd", runlocal=False, steps=10, lr=0.5)
  assert parse("scheme=joint,runlocal") == dict(scheme="joint", runlocal=True, steps=10, lr=0.5)
  assert parse(None) == dict(scheme="ukd", runlocal=False, steps=10, lr=0.5)
  assert parse("runlocal=False")["runlocal"] is False
  assert parse("runlocal=yes,steps=7,lr=1e-3") == dict(
    scheme="ukd", runlocal=True, steps=7, lr=1e-3
  )


@pytest.mark.parametrize(
  "arg,message",
  [
    ("runlocl", "config argument 'runlocl' is not one of ['lr', 'runlocal', 'scheme', 'steps']"),
    ("runlocal=maybe", "config argument runlocal='maybe' must be a bool"),
    ("steps=ten", "config argument steps='ten' must be a int"),
    ("steps", "config argument steps=None must be a int"),
  ],
)
def test_parse_arg_rejects_unknown_keys_and_bad_values(arg, message):
  with pytest.raises(ConfigError) as e:
    config_lib.parse_arg(arg, scheme="ukd", runlocal=False, steps=10, lr=0.5)
  assert str(e.value).startswith(message)


@pytest.mark.parametrize("name", ["mmwhs", "abdominal", "amos", "demo", "study"])
def test_every_config_rejects_a_misspelled_argument(name):
  module = importlib.import_module(f"configs.{name}")
  with pytest.raises(ConfigError, match="is not one of"):
    module.get_config("runlocl")


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("total_steps", 0, "config.total_steps=0"),
    ("modalities", ("ct", "ct"), "distinct"),
    ("modalities", ("ct", "pet"), "config.data.norm has no intensity normalisation for ['pet']"),
    ("eval_every", -1, "config.eval_every=-1"),
    ("overlays", -1, "config.overlays=-1 must be a whole number >= 0"),
    ("profile", (3,), "must be 2 whole numbers >= 0"),
    ("profile", (0, 5), "steps count from 1"),
  ],
)
def test_validate_names_the_field(field, value, message):
  config = config_lib.default()
  config[field] = value
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    config_lib.check(config)


def test_resolve_fills_discovered_fields_freezes_and_leaves_the_callers_config():
  original = importlib.import_module("configs.demo").get_config(None)
  before = original.to_dict()
  resolved = config_lib.resolve(original, root="/data/phantoms", classes=tuple("abcdefg"))
  assert resolved.data.root == "/data/phantoms" and resolved.model.num_classes == 7
  assert original.to_dict() == before  # discovered values are returned, not written back
  with pytest.raises((AttributeError, TypeError, ValueError)):
    resolved.model.num_classes = 3
  # What a checkpoint saves comes back identical and frozen.
  again = config_lib.frozen(resolved.to_dict())
  assert again == resolved and isinstance(again, type(resolved))


def test_paper_configs_follow_the_reference_recipe():
  c = importlib.import_module("configs.mmwhs").get_config(None)
  assert (c.loss.kd_absent, c.model.head_bias, c.model.pad) == ("uniform", False, "reference")
  assert (c.loss.l2_scope, c.loss.l2, c.model.init) == ("kernels", 1e-4, "reference")
  a = importlib.import_module("configs.abdominal").get_config(None)
  assert (a.loss.kd_absent, a.model.head_bias, a.model.init) == ("uniform", True, "reference")
  # The reference's 1e-4 on every variable, in each of the two modalities' losses.
  assert (a.loss.l2_scope, a.loss.l2) == ("all", 2e-4)


def test_a_config_saved_before_the_recipe_fields_rebuilds_its_network():
  resolved = config_lib.resolve(
    importlib.import_module("configs.mmwhs").get_config(None), root="/data", classes=tuple("abcde")
  )
  saved = resolved.to_dict()
  for field in ("head_bias", "pad", "x_split"):
    del saved["model"][field]
  model = config_lib.frozen(saved).model
  # Both networks' heads had a bias, every convolution padded with zeros.
  assert (model.head_bias, model.pad, model.x_split) == (True, "zeros", 2)


def test_resolve_checks_the_config():
  config = importlib.import_module("configs.demo").get_config(None)
  config.loss.kd_absent = "ignore"
  with pytest.raises(ConfigError, match="config.loss.kd_absent='ignore'"):
    config_lib.resolve(config, root="/x", classes=tuple("abcde"))


def test_pod_variant_scales_the_schedule_with_the_global_batch():
  c = importlib.import_module("configs.mmwhs").get_config("pod")
  # 64 = 8 x the paper's batch: lr x sqrt(8), decay interval and length / 8.
  assert c.batch_size == 64
  assert c.optim.lr == pytest.approx(1e-3 * 8**0.5)
  assert (c.optim.decay_steps, c.total_steps, c.eval_every) == (125, 18_750, 250)
  config_lib.check(c)


def test_mmwhs_prepares_data_from_the_image_alone():
  c = importlib.import_module("configs.mmwhs").get_config(None)
  assert (c.data.slice_axis, c.data.crop) == (1, "body")
  assert c.data.augment.rotate > 0 and c.data.augment.scale > 0


def test_study_config_builds_on_its_sibling_configs_without_the_study_runner():
  """configs/study.py is data: its runs start from demo.py (or mmwhs.py) imported as modules of
  `ukd.configs`, so it loads the same in a checkout and installed, and never needs ukd.study.runner."""
  code = (
    "import sys\n"
    "from ukd.configs import study\n"
    "c = study.get_config('mmwhs')\n"
    "print(c.base.data.dataset, c.base.total_steps, 'ukd.study.runner' in sys.modules)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ["mmwhs", "50000", "False"], out.stderr[-2000:]
  study = importlib.import_module("configs.study")
  micro = study.get_config("micro")
  tiny = importlib.import_module("configs.demo").get_config("tiny")
  assert micro.base.model == tiny.model and micro.base.total_steps == tiny.total_steps
  assert micro.base.data.root == config_lib.REQUIRED  # the study sets it per study dir
  full = study.get_config(None)
  assert (full.reference, full.train, tuple(full.seeds)) == ("ukd", "schemes", (0, 1, 2))
  # The paper's schemes, and KD with each absent-class rule for the arms that compare them.
  assert sorted(full.schemes) == sorted([*models.SCHEMES, "ukd_kd_mask", "ukd_kd_uniform"])
  assert full.base.total_steps == 400 and full.base.model.width == 4


def test_abdominal_all_ct_organs_trains_btcvs_13_of_which_mr_labels_4():
  from ukd.data import adapters

  config = importlib.import_module("configs.abdominal").get_config("all_ct_organs")
  adapter = adapters.get_adapter("abdominal", **config.data.options.to_dict())
  assert config.model.num_classes == len(adapter.classes) == 14
  held = {m: adapter.labelled(m) for m in config.modalities}
  resolved = config_lib.resolve(config, root="/data", classes=adapter.classes, held=held)
  # MR labels liver (6), right kidney (2), left kidney (3) and spleen (1) of BTCV's order.
  assert resolved.data.label_sets.to_dict() == {"mr": (0, 1, 2, 3, 6)}


def test_abdominal_sequences_trains_ct_and_two_chaos_sequences():
  from ukd.data import adapters

  config = importlib.import_module("configs.abdominal").get_config("sequences,runlocal")
  adapter = adapters.get_adapter("abdominal", **config.data.options.to_dict())
  assert tuple(config.modalities) == adapter.modalities == ("ct", "t1in", "t2")
  resolved = config_lib.resolve(config, root="/data", classes=adapter.classes)
  assert dict(resolved.infer.dicom_sequences) == {"t1in": r"in[ _-]?phase", "t2": r"t2"}
  assert resolved.data.norm.t1in.kind == resolved.data.norm.t2.kind == "zscore"
