r"""The paper's cardiac setting: MM-WHS 2017 CT + MR, the 2D dilated network, scheme ukd.

  python -m ukd.main --config=configs/mmwhs.py --workdir=runs/mmwhs \
      --config.data.root=/data/MMWHS

Variants: `configs/mmwhs.py:scheme=joint` (any scheme: single, joint, separate_norm, ukd,
x_shape, y_shape); `configs/mmwhs.py:runlocal` for a quick check on a laptop.
"""

from ukd import config as config_lib


def get_config(arg=None):
  c = config_lib.default()
  args = config_lib.parse_arg(arg, scheme="ukd", runlocal=False)
  c.data.dataset = "mmwhs"
  c.modalities = ("ct", "mr")
  c.model.name = "dilated2d"
  c.model.scheme = args["scheme"]
  c.model.num_classes = 5  # background, MYO, LAC, LVC, AA
  c.model.width = 16
  c.model.dropout = 0.25  # keep probability 0.75
  c.data.size = (256, 256)  # 3 adjacent slices at 256x256
  c.batch_size = 8  # per modality
  c.optim.lr = 1e-3
  c.optim.decay_rate = 0.95
  c.optim.decay_steps = 1000
  c.total_steps = 150_000
  c.loss.dice, c.loss.ce, c.loss.kd, c.loss.temperature, c.loss.l2 = 1.0, 1.0, 0.5, 2.0, 1e-4
  c.eval_every = c.checkpoint_every = 2000
  if args["runlocal"]:
    c.model.width = 4
    c.data.size = (128, 128)
    c.total_steps = 200
    c.eval_every = c.checkpoint_every = 100
    c.log_every = 10
  return c
