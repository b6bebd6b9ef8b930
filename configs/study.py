r"""The scheme comparison of the paper in four arms, and its ablations.

  python -m ukd.study.runner --config=configs/study.py --workdir=runs/study
  python -m ukd.study.runner --config=configs/study.py:ablations --workdir=runs/study_ablations

The default trains the six sharing schemes x 3 seeds on synthetic cardiac phantoms (MM-WHS
layout) in four arms, each into `<workdir>/<arm>/` (`--arms=mr_scarce` narrows it):
  balanced_simple   both modalities with all training cases, the simple phantoms;
  balanced_scanner  the same on the scanner-realistic phantoms (`data.synthetic.realism`);
  mr_scarce         scanner phantoms, all CT training cases, 25 % of the MR ones;
  ct_scarce         the mirror image;
  mr_partial        the paper config's recipe (`_PAPER`); CT labels all four structures, MR's
                    training and validation labels only MYO and LVC (`data.labelled`), its test
                    labels all four: what MR never saw labelled is learnt from CT alone;
  mr_scarce_long    mr_scarce with the paper config's recipe at 5x the steps, `ukd` against
                    `separate_norm`: does KD's effect grow with training?
  three_modalities  CT, b-SSFP MR and T2-weighted black-blood MR (its blood contrast
                    inverted) of the scanner set, as nnU-Net style folders: one network,
                    three modalities, KD over the three pairs.
The scarce arms and `mr_partial` also run KD with the other absent-class rule
(`ukd_kd_mask` / `ukd_kd_uniform`), so each says which rule helps, hurts or does nothing.
`:ablations` trains the ablation variants (one seed each) on the simple phantoms.  `:mmwhs`
is the paper-scale study on MM-WHS for a GPU or TPU:

  python -m ukd.study.runner --config=configs/study.py:mmwhs --workdir=gs://bucket/study \
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
  """The demo's phantoms and network (lecun-normal init), slices resized to 64 x 64, trained
  for 400 steps a run with the rate falling 0.6x every 100 (2e-3 to 2.6e-4), validated twice."""
  c = demo.get_config()
  c.data.root = config_lib.REQUIRED  # set by the study: <study dir>/phantoms
  c.data.spacing = ""  # slices resized to 64 x 64, as the study's published runs were
  c.total_steps = 400
  c.optim.decay_steps = 100
  c.optim.decay_rate = 0.6
  c.eval_every = c.checkpoint_every = 200
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
    "train_cases_25": {"data": {"train_fraction": "0.25"}},
    "train_cases_50": {"data": {"train_fraction": "0.5"}},
    # Does sharing help more when data is scarce? The baselines at the smallest budget.
    "single_train_cases_25": {"model": {"scheme": "single"}, "data": {"train_fraction": "0.25"}},
    "joint_train_cases_25": {"model": {"scheme": "joint"}, "data": {"train_fraction": "0.25"}},
  }


_SCANNER = {"synthetic": {"realism": "scanner"}}
# The paper config's recipe (`configs/mmwhs.py`) where it differs from the demo's: the
# reference's rule for a class absent from a batch, its mirror padding and no head bias.
_PAPER = {"loss": {"kd_absent": "uniform"}, "model": {"pad": "reference", "head_bias": False}}
# KD with each absent-class rule, beside the scheme table's `ukd` (which takes the arm's rule).
_KD_RULES = {
  "ukd_kd_mask": {"model": {"scheme": "ukd"}, "loss": {"kd_absent": "mask"}},
  "ukd_kd_uniform": {"model": {"scheme": "ukd"}, "loss": {"kd_absent": "uniform"}},
}


# CT + two MR contrasts of the scanner set (`ukd.data.synthetic.scanner_phantoms`), written as
# one nnU-Net style folder per modality: 20 cases each, split 60/20/20 as the other arms.
_THREE = {
  "modalities": ("ct", "mr", "t2"),
  "data": {
    "dataset": "folder",
    "options": {"modalities": {"ct": "ct", "mr": "mr", "t2": "t2"}},
    "synthetic": {"realism": "scanner", "contrasts": {"t2": "mr_t2"}},
    "norm": {"t2": {"kind": "zscore", "percentiles": (0.5, 99.5)}},
  },
}


def _arms():
  """Each arm: overrides of the base (phantom set, per-modality budget) and its variants.
  20 + 20 phantoms split 60/20/20 give each modality 12 training volumes: 25 % is 3."""
  every = tuple(SCHEMES)
  return {
    "balanced_simple": {
      "doc": "Both modalities, all 12 training volumes each, simple phantoms.",
      "base": {},
      "variants": every,
    },
    "balanced_scanner": {
      "doc": "Both modalities, all 12 training volumes each, scanner-realistic phantoms.",
      "base": {"data": _SCANNER},
      "variants": every,
    },
    "mr_scarce": {
      "doc": "Scanner-realistic phantoms; all 12 CT training volumes, 3 MR ones (25 %).",
      "base": {"data": {**_SCANNER, "train_fraction": "ct=1,mr=0.25"}},
      "variants": (*every, "ukd_kd_uniform"),
    },
    "ct_scarce": {
      "doc": "Scanner-realistic phantoms; 3 CT training volumes (25 %), all 12 MR ones.",
      "base": {"data": {**_SCANNER, "train_fraction": "ct=0.25,mr=1"}},
      "variants": (*every, "ukd_kd_uniform"),
    },
    "mr_partial": {
      "doc": "Paper recipe, scanner phantoms; MR trained and validated on MYO and LVC only, "
      "tested on all four structures.",
      "base": {**_PAPER, "data": {**_SCANNER, "labelled": "mr=MYO+LVC"}},
      "variants": (*every, "ukd_kd_mask"),
    },
    "mr_scarce_long": {
      "doc": "Paper recipe, scanner phantoms, 3 MR training volumes, 2000 steps (5x).",
      "base": {
        **_PAPER,
        "data": {**_SCANNER, "train_fraction": "ct=1,mr=0.25"},
        "total_steps": 2000,
        "optim": {"decay_steps": 500},
        "eval_every": 1000,
        "checkpoint_every": 1000,
      },
      "variants": ("ukd", "separate_norm", "ukd_kd_mask"),
    },
    "three_modalities": {
      "doc": "Scanner phantoms: CT, b-SSFP MR and T2-weighted MR, 12 training volumes each.",
      "base": _THREE,
      "variants": ("single", "joint", "separate_norm", "ukd"),
    },
  }


def get_config(arg=None):
  args = config_lib.parse_arg(arg, ablations=False, mmwhs=False, micro=False)
  c = mc.ConfigDict()
  c.base = _synthetic_base()  # the training config every run starts from
  # name -> nested overrides of base: the paper's table, then the second table.
  c.schemes = {name: {"model": {"scheme": name}} for name in SCHEMES} | _KD_RULES
  c.ablations = _ablations()
  c.arms = _arms()  # arm -> {doc, base overrides, variants}; {}: one study of c.schemes
  c.reference = "ukd"  # the variant the paired tests compare every other one with
  c.train = "schemes"  # which variants to train: schemes | ablations | all
  c.seeds = (0, 1, 2)  # seeds of every trained variant (parameters, split, sampling)
  if args["ablations"]:
    c.train = "ablations"
    c.seeds = (0,)
    c.arms = {}
  if args["mmwhs"]:
    c.base = mmwhs.get_config()
    c.base.total_steps = 50_000
    c.schemes = {name: {"model": {"scheme": name}} for name in SCHEMES}
    c.arms = {}
  if args["micro"]:  # the test suite's variant: 2 schemes, 1 seed, a few steps
    c.base = demo.get_config("tiny")
    c.base.data.root = config_lib.REQUIRED
    c.base.overlays = 0
    c.schemes = {name: {"model": {"scheme": name}} for name in ("single", "ukd")}
    c.ablations = {"kd_weight_0": {"loss": {"kd": 0.0}}}
    c.seeds = (0,)
    c.arms = {}
  return c
