r"""The paper's cardiac setting: MM-WHS 2017 CT + MR, the 2D dilated network, scheme ukd.

  python -m ukd.main --config=configs/mmwhs.py --workdir=runs/mmwhs \
      --config.data.root=/data/MMWHS

Variants (`:key=value,...`): `scheme=joint` (any scheme: single, joint, separate_norm, ukd,
x_shape, y_shape); `runlocal` for a quick check on a laptop; `pod` for a TPU pod slice or
several GPU nodes (global batch 64 + 64):

  launch/tpu_pod.sh ukd-v4 us-central2-b v4-32 configs/mmwhs.py:pod gs://bucket/runs/mmwhs \
      --config.data.root=/mnt/data/MMWHS

Data preparation follows the reference as far as an image-only pipeline allows: coronal
slices (canonical axis 1, the view of the authors' released slices), 3 neighbouring slices
as channels, 256x256 inputs, augmentation on (rotation, zoom, intensity). The reference
cropped a box around the heart found from the ground truth; ukd crops to the body, found
from the image, so training, evaluation and prediction see the same kind of input and no
score depends on a label the network would not have.

Pixel size: `data.spacing='1'` resamples every slice in-plane to 1 x 1 mm (and predictions
back), so a heart is about as many pixels across in every patient and in both modalities.
The released volumes hold CT at about 0.28-0.58 mm in-plane with 0.45-0.62 mm slices, and MR
acquired at about 2 mm and reconstructed to about 0.8-1.1 mm in-plane with 1-1.6 mm slices
(Zhuang et al., MedIA 2019).  A coronal slice spans the left-right axis and the axial slice
direction, so 1 mm is about MR's own reconstruction in both (nothing finer was acquired in MR);
CT goes down 1.6-3.6x, to the scale at which the two modalities can share kernels.  The
256-pixel window then spans 256 mm: a whole heart (12-15 cm) with its surroundings; a wider
body is covered by sliding windows, in training and in prediction.  `runlocal` keeps that
field of view with 128 pixels of 2 mm.

The recipe is the reference code's (Dou et al.'s released 2D TensorFlow code): a class absent
from one modality's batch gets all-zero mean logits there, i.e. a uniform distribution in the
KD term, and the KL is divided by all C classes (`loss.kd_absent='uniform'`); the 5x5 head has
no bias (`model.head_bias=False`); the 3x3 convolution before the depth-to-space and the head
pad by mirroring, the border row included (tf.pad's SYMMETRIC mode: 1 2 3 -> 2 1 1 2 3 3 2),
while every other convolution pads with zeros (`model.pad='reference'`); L2 of 1e-4 on the
convolution kernels, added once to the sum of both modalities' losses.
"""

import math

from ukd import config as config_lib

# The paper's global batch (per modality), and the learning rate and decay interval tuned for it.
PAPER_BATCH, PAPER_LR, PAPER_DECAY_STEPS, PAPER_STEPS = 8, 1e-3, 1000, 150_000


def get_config(arg=None):
  args = config_lib.parse_arg(arg, scheme="ukd", runlocal=False, pod=False)
  c = config_lib.default()
  c.data.dataset = "mmwhs"
  c.modalities = ("ct", "mr")
  c.model.name = "dilated2d"
  c.model.scheme = args["scheme"]
  c.model.num_classes = 5  # background, MYO, LAC, LVC, AA
  c.model.width = 16
  c.model.dropout = 0.25  # keep probability 0.75
  c.data.size = (256, 256)  # 3 adjacent slices at 256x256
  c.data.slice_axis = 1  # coronal
  c.data.crop = "body"
  c.data.spacing = "1"  # mm in-plane, CT and MR alike (see the docstring)
  c.data.fg_fraction = 0.5
  c.data.augment.rotate = 15.0
  c.data.augment.scale = 0.1
  c.data.augment.intensity = 0.1
  c.batch_size = PAPER_BATCH  # per modality
  c.optim.lr = PAPER_LR
  c.optim.decay_rate = 0.95
  c.optim.decay_steps = PAPER_DECAY_STEPS
  c.total_steps = PAPER_STEPS
  c.model.head_bias = False
  c.model.pad = "reference"
  # On a CPU, the wide 3x3 convolution before the depth-to-space (forward and gradients) and
  # the head's kernel gradient as matmuls: the train step at width 4 runs 20-25 % faster,
  # the eval forward about 8 %.  GPUs and TPUs keep XLA's own convolutions either way; only
  # forward-mode derivatives (jax.jvp) through the model need 'xla'.
  c.model.conv_grads = "cpu_matmul"
  c.loss.dice, c.loss.ce, c.loss.kd, c.loss.temperature, c.loss.l2 = 1.0, 1.0, 0.5, 2.0, 1e-4
  c.loss.l2_scope = "kernels"
  c.loss.kd_absent = "uniform"
  c.eval_every = c.checkpoint_every = 2000
  if args["pod"]:
    scale_for_batch(c, 64)
  if args["runlocal"]:
    c.model.width = 4
    c.data.size = (128, 128)
    c.data.spacing = "2"
    c.total_steps = 200
    c.eval_every = c.checkpoint_every = 100
    c.log_every = 10
  return c


def scale_for_batch(c, batch: int) -> None:
  """A larger global batch: Adam's rate grows with the square root of the batch ratio, and
  the decay interval, the run length and the eval/checkpoint intervals shrink with the ratio,
  so the schedule and the number of samples seen match the paper's."""
  ratio = batch / PAPER_BATCH
  c.batch_size = batch
  c.optim.lr = PAPER_LR * math.sqrt(ratio)
  c.optim.decay_steps = max(1, round(PAPER_DECAY_STEPS / ratio))
  c.total_steps = round(PAPER_STEPS / ratio)
  c.eval_every = c.checkpoint_every = max(1, round(2000 / ratio))
