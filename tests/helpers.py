"""Small configs, inputs and command-line runs shared by the tests."""

import json
import os
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np

from ukd import config as config_lib
from ukd import models
from ukd.train import state as state_lib


def tiny_config(name="dilated2d", scheme="ukd", modalities=("ct", "mr"), num_classes=3):
  c = config_lib.default()
  c.modalities = modalities
  c.batch_size = 4
  c.model.name = name
  c.model.scheme = scheme
  c.model.num_classes = num_classes
  c.model.width = 2
  c.model.upsample_mult = 1
  c.model.dropout = 0.0
  return c


def toy_batch(config, spatial=(32, 32), seed=0):
  """A learnable toy problem: class k where the image is bright in channel-mean band k."""
  rng = np.random.default_rng(seed)
  batch = {}
  channels = 3 if config.model.name == "dilated2d" else 1
  for i, m in enumerate(config.modalities):
    label = np.zeros((config.batch_size, *spatial), np.int32)
    label[:, 4:12, 4:12, ...] = 1
    label[:, 16:28, 8:24, ...] = config.model.num_classes - 1
    image = label[..., None] * (1.0 + i) + rng.normal(0, 0.3, label.shape + (channels,))
    batch[m] = {"image": image.astype(np.float32), "label": label}
  return batch


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, timeout=300, check=True):
  """`python -m <module> args...` from the checkout; with `check`, it must exit 0."""
  out = subprocess.run(
    [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
  )
  if check:
    assert out.returncode == 0, out.stderr[-4000:]
  return out


def on_devices(count: int, *args, timeout=300) -> dict:
  """`python args...` on `count` simulated CPU devices; returns the JSON of its last line.
  The device count must be set before JAX starts, hence a process of its own."""
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={count} --xla_backend_optimization_level=0",
    JAX_TRANSFER_GUARD="allow",  # the scripts themselves compute with jnp on host values
  )
  out = subprocess.run(
    [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def random_variables(config, seed=0):
  """Random weights of the config's network without compiling its initialiser: kernels at
  lecun scale, unit scales and variances, zero offsets and means."""
  import jax

  from ukd import models

  model = models.build(config.model, config.modalities)
  shapes = jax.eval_shape(
    lambda: models.init_variables(
      model, config.model, models.input_spatial(config), jax.random.key(0)
    )
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(path[-1].key)
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)
    return np.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def write_folder_dataset(root, modalities, count, make_case, affine, labels=None):
  """nnU-Net style folders `<root>/<modality>/{imagesTr,labelsTr}` with a dataset.json
  naming classes A (1) and B (2), or the {name: index} that `labels` gives a modality;
  `make_case(modality, k)` gives case k's (image, label) arrays, called modality by
  modality, case by case."""
  import json

  import nibabel as nib

  for modality in modalities:
    folder = os.path.join(root, modality)
    for sub in ("imagesTr", "labelsTr"):
      os.makedirs(os.path.join(folder, sub))
    names = (labels or {}).get(modality, {"background": 0, "A": 1, "B": 2})
    with open(os.path.join(folder, "dataset.json"), "w") as f:
      json.dump({"labels": names, "file_ending": ".nii.gz"}, f)
    for k in range(count):
      image, label = make_case(modality, k)
      nib.save(
        nib.Nifti1Image(image, affine), os.path.join(folder, "imagesTr", f"case{k}_0000.nii.gz")
      )
      nib.save(nib.Nifti1Image(label, affine), os.path.join(folder, "labelsTr", f"case{k}.nii.gz"))


# 0.8 mm along a row, 0.7 mm down a column, 2.5 mm slices, rotated 30 degrees about z: an
# oblique grid with a positive determinant (a NIfTI a converter might write).
_COS, _SIN = np.cos(np.radians(30)), np.sin(np.radians(30))
OBLIQUE_AFFINE = np.array(
  [
    [0.8 * _COS, -0.7 * _SIN, 0.0, -12.0],
    [0.8 * _SIN, 0.7 * _COS, 0.0, 5.0],
    [0.0, 0.0, 2.5, 30.0],
    [0.0, 0.0, 0.0, 1.0],
  ]
)


# ---- A random network that predicts like a trained one (test_infer, test_predict_dicom) ----

SIZE = (16, 16)
PATCH = (16, 16, 8)
STEP = 3
# What training records of its dataset: MM-WHS-like codes, one of them beyond a byte.
RECORD = {
  "splits": {"ct": {"train": ["a"], "val": ["b"], "test": ["c"]}},
  "classes": ["background", "MYO", "AA"],
  "label_codes": {"ct": [0, 205, 820], "mr": [0, 63, 126]},
}


def infer_config(name="dilated2d", batch=8, width=2):
  config = tiny_config(name)
  config.model.width = width
  # lecun-normal: the reference's std-0.01 kernels give an untrained network near-equal class
  # scores, whose argmax float rounding can flip.
  config.model.init = "lecun"
  config.data.size = SIZE
  config.data.patch = PATCH
  config.infer.batch_size = batch
  return config


def variables_of(state):
  return {"params": state.params, "batch_stats": state.batch_stats}


def new_state(config):
  """A freshly initialised train state; jitted, which compiles faster than running eagerly."""
  model = models.build(config.model, config.modalities)
  spatial = models.input_spatial(config)
  return jax.jit(lambda key: state_lib.create(config, model, spatial, key))(jax.random.key(0))


def ct_like(shape, seed=0):
  """Smooth blobs plus noise in HU, so a random network still predicts several classes."""
  rng = np.random.default_rng(seed)
  grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
  blob = sum(np.cos(3 * g + p) for g, p in zip(grid, rng.uniform(0, 3, 3)))
  return (300 * blob + rng.normal(0, 50, shape)).astype(np.float32)


def save_nifti(array, affine, path):
  image = nib.Nifti1Image(array, affine)
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  nib.save(image, str(path))
  return str(path)


# Voxel axes (0, 1, 2) point Superior, Left, Posterior, slightly tilted: nothing is canonical.
OBLIQUE_LPS = np.array(
  [[0.05, -1.2, 0.0, 10.0], [0.0, 0.03, -1.5, -20.0], [2.5, 0.0, 0.04, 5.0], [0.0, 0.0, 0.0, 1.0]]
)
