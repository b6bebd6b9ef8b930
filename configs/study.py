r"""The scheme comparison of the paper, and its ablations, as one study.

  python -m ukd.study --config=configs/study.py --workdir=runs/study
  python -m ukd.study --config=configs/study.py:ablations --workdir=runs/study

The default trains the six sharing schemes x 3 seeds on synthetic cardiac phantoms (MM-WHS
layout) on a CPU; `:ablations` trains the ablation variants (one seed each) into the same
study dir, and every report covers both.  `:mmwhs` is the paper-scale study on MM-WHS for a
GPU or TPU:

  python -m ukd.study --config=configs/study.py:mmwhs --workdir=gs://bucket/study \
      --config.base.data.root=/data/MMWHS

`--only=ukd,single` and `--seeds=0,1` narrow any of them; a stopped study resumes.
Every variant is a set of nested overrides of `base` (`{'loss': {'kd': 0.0}}`): no code path
of its own.  The fields a study config fills in are those of `get_config` below.
"""

import ml_collections as mc

from ukd import config as config_lib
from ukd.configs import demo, mmwhs
from ukd.models import SCHEMES


def _synthetic_base():
  """The demo's phantoms and network (lecun-normal init), trained for 600 steps a run."""
  c = demo.get_config()
  c.data.root = config_lib.REQUIRED  # set by the study: <study dir>/phantoms
  c.data.spacing = ""  # slices resized to 64 x 64, as the study's published runs were
  c.total_steps = 600
  c.eval_every = c.checkpoint_every = 100
  c.overlays = 0
  return c


def _ablations():
  """Each ablation changes one thing of `ukd`, the base's scheme (KD weight 0.5, T 2,
  symmetric KL, absent classes masked, all training cases); `ukd` is the reference row."""
  return {
    "kd_weight_0": {"loss": {"kd": 0.0}},
    "kd_weight_0_1": {"loss": {"kd": 0.1}},
    "kd_weight_1": {"loss": {"kd": 1.0}},
    "temperature_1": {"loss": {"temperature": 1.0}},
    "temperature_4": {"loss": {"temperature": 4.0}},
    "kd_distance_l2": {"loss": {"kd_distance": "l2"}},
    "kd_absent_uniform": {"loss": {"kd_absent": "uniform"}},
    "train_cases_25": {"data": {"train_fraction": 0.25}},
    "train_cases_50": {"data": {"train_fraction": 0.5}},
    # Does sharing help more when data is scarce? The baselines at the smallest budget.
    "single_train_cases_25": {"model": {"scheme": "single"}, "data": {"train_fraction": 0.25}},
    "joint_train_cases_25": {"model": {"scheme": "joint"}, "data": {"train_fraction": 0.25}},
  }


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ablations=False, mmwhs=False, micro=False)
  c = mc.ConfigDict()
  c.base = _synthetic_base()  # the training config every run starts from
  # name -> nested overrides of base: the paper's table, then the second table.
  c.schemes = {name: {"model": {"scheme": name}} for name in SCHEMES}
  c.ablations = _ablations()
  c.reference = "ukd"  # the variant the paired tests compare every other one with
  c.train = "schemes"  # which variants to train: schemes | ablations | all
  c.seeds = (0, 1, 2)  # seeds of every trained variant (parameters, split, sampling)
  if args["ablations"]:
    c.train = "ablations"
    c.seeds = (0,)
  if args["mmwhs"]:
    c.base = mmwhs.get_config()
    c.base.total_steps = 50_000
  if args["micro"]:  # the test suite's variant: 2 schemes, 1 seed, a few steps
    c.base = demo.get_config("tiny")
    c.base.data.root = config_lib.REQUIRED
    c.base.overlays = 0
    c.schemes = {name: {"model": {"scheme": name}} for name in ("single", "ukd")}
    c.ablations = {"kd_weight_0": {"loss": {"kd": 0.0}}}
    c.seeds = (0,)
  return c
