r"""The paper's abdominal setting: BTCV CT + CHAOS T2-SPIR MR, the 3D U-Net, scheme ukd.

  python -m ukd.main --config=configs/abdominal.py --workdir=runs/abdominal \
      --config.data.root=/data/abdominal     # holds BTCV/ and CHAOS/

Variants: `configs/abdominal.py:scheme=joint` (any scheme); `:runlocal` for a quick check.
"""

from ukd import config as config_lib


def get_config(arg=None):
  c = config_lib.default()
  args = config_lib.parse_arg(arg, scheme="ukd", runlocal=False)
  c.data.dataset = "abdominal"
  c.modalities = ("ct", "mr")
  c.model.name = "unet3d"
  c.model.scheme = args["scheme"]
  c.model.num_classes = 5  # background, liver, right kidney, left kidney, spleen
  c.model.width = 16
  c.data.size = (256, 256)
  c.data.patch = (256, 256, 8)
  c.data.fg_fraction = 0.5
  c.loss.l2_scope = "all"  # the reference 3D code penalises every trainable variable
  c.batch_size = 2  # per modality
  c.optim.lr = 1e-4
  c.optim.decay_rate = 0.95
  c.optim.decay_steps = 500
  c.total_steps = 50_000
  c.eval_every = c.checkpoint_every = 1000
  if args["runlocal"]:
    c.model.width = 4
    c.data.size = (64, 64)
    c.data.patch = (64, 64, 8)
    c.total_steps = 100
    c.eval_every = c.checkpoint_every = 50
    c.log_every = 10
  return c
