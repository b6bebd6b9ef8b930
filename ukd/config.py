"""The default configuration every config file builds on, and its validation.

Configs are data: a `configs/<name>.py` file returns `default()` with some fields
changed.  Every field is documented here in one line.  Fields a user must set
hold a placeholder (ml_collections cannot override a field that is None).
"""

import ml_collections as mc

from ukd.errors import ConfigError

REQUIRED = "<required>"


def default() -> mc.ConfigDict:
  c = mc.ConfigDict()
  c.seed = 0  # seeds parameters, dropout, splits and sampling
  c.modalities = ("ct", "mr")  # modality names; one batch of each per step
  c.total_steps = 150_000  # train steps
  c.batch_size = 8  # per modality, global (split over devices/hosts)

  c.model = mc.ConfigDict()
  c.model.name = "dilated2d"  # 'dilated2d' (2D, cardiac) or 'unet3d' (3D, abdominal)
  c.model.scheme = "ukd"  # single | joint | separate_norm | ukd | x_shape | y_shape
  c.model.num_classes = 5  # classes including background (set from the dataset)
  c.model.width = 16  # base width (16 in the paper)
  c.model.dropout = 0.25  # dropout rate of the 2D network (keep 0.75)
  c.model.upsample_mult = 8  # 2D: the last conv has 8*8*C*upsample_mult channels
  c.model.dtype = "float32"  # convolutions: 'float32' | 'bfloat16' (params, norms, losses f32)
  c.model.init = "reference"  # kernels: 'reference' (truncated normal, std 0.01) | 'lecun'

  c.loss = mc.ConfigDict()
  c.loss.dice = 1.0  # weight of the soft Dice loss (per modality)
  c.loss.ce = 1.0  # weight of the class-weighted cross-entropy
  c.loss.kd = 0.5  # weight of the KD loss (schemes with kd only)
  c.loss.temperature = 2.0  # KD softmax temperature
  c.loss.kd_distance = "kl"  # 'kl' (symmetric KL) or 'l2'
  c.loss.kd_absent = "mask"  # class absent from a modality's batch: 'mask' | 'uniform' (reference)
  c.loss.l2 = 1e-4  # weight of 1/2 sum of squares of the parameters in l2_scope
  c.loss.l2_scope = "kernels"  # 'kernels' (2D reference) or 'all' parameters (3D reference)

  c.optim = mc.ConfigDict()
  c.optim.lr = 1e-3  # Adam learning rate
  c.optim.decay_rate = 0.95  # multiply the rate by this ...
  c.optim.decay_steps = 1000  # ... every this many steps
  c.optim.eps = 1e-8  # Adam epsilon (TensorFlow's and optax's default)

  c.data = mc.ConfigDict()
  c.data.dataset = "mmwhs"  # adapter: mmwhs | abdominal | folder
  c.data.root = REQUIRED  # dataset root directory (local or gs://bucket/path)
  c.data.options = mc.ConfigDict()  # adapter options (e.g. folder: modalities={...})
  c.data.synthetic = mc.ConfigDict()  # phantoms generated into the root on first use
  c.data.synthetic.enabled = False  # generate (root '' or unset: <workdir>/phantoms)
  c.data.synthetic.n_ct = 10  # CT cases
  c.data.synthetic.n_mr = 10  # MR cases
  c.data.synthetic.seed = 0  # phantoms' own seed (the same phantoms for every training seed)
  c.data.synthetic.shape = (96, 96, 40)  # voxels per phantom
  c.data.split_fractions = (0.6, 0.2, 0.2)  # train / val / test fractions per modality
  c.data.train_fraction = 1.0  # share of each modality's training cases used (data budget)
  c.data.split_file = ""  # a splits.json to use instead of a seeded split
  c.data.cache_dir = ""  # volume cache ('' = <workdir>/cache); gs://... -> ~/.cache/ukd/<hash>
  c.data.size = (256, 256)  # in-plane size the network sees
  c.data.slice_axis = 2  # canonical (RAS) axis along which slices are taken
  c.data.crop = "none"  # none | body | foreground: in-plane crop before resize
  c.data.crop_margin = 8  # voxels kept around the crop box
  c.data.norm = mc.ConfigDict()  # per-modality intensity normalisation
  c.data.norm.ct = dict(kind="window", window=(-1000.0, 1000.0))
  c.data.norm.mr = dict(kind="zscore", percentiles=(0.5, 99.5))
  c.data.patch = (256, 256, 8)  # 3D patch (H, W, S)
  c.data.fg_fraction = 0.0  # probability of sampling a slice/patch with foreground
  c.data.augment = mc.ConfigDict()  # all off by default, as in the paper
  c.data.augment.flip = False  # random flips of the in-plane axes
  c.data.augment.rotate = 0.0  # max rotation in degrees
  c.data.augment.scale = 0.0  # max relative zoom (0.1 = 0.9..1.1)
  c.data.augment.intensity = 0.0  # max intensity scale/shift jitter
  c.data.workers = 2  # grain worker processes (0 = in-process)
  c.data.prefetch = 4  # batches buffered per worker

  c.infer = mc.ConfigDict()
  c.infer.batch_size = 32  # slices (2D) or windows (3D) per device call
  c.infer.overlap = 0.5  # 3D sliding-window overlap

  c.log_every = 50  # steps between metric lines
  c.eval_every = 1000  # steps between validations (0 = only at the end)
  c.checkpoint_every = 1000  # steps between checkpoints (and at the end)
  c.keep_best = 1  # best checkpoints kept (by validation mean Dice)
  c.overlays = True  # write overlay pictures in evaluations
  return c


def parse_arg(arg, **known) -> dict:
  """The `:key=value,flag` suffix of `--config=configs/x.py:...`, over the defaults `known`.

  `parse_arg("scheme=joint,runlocal", scheme="ukd", runlocal=False)` ->
  {'scheme': 'joint', 'runlocal': True}.  Each value is parsed as the type of its default
  (bool: true/false/1/0/yes/no, a bare key meaning true; int; float; str); a key the config
  does not know, or a value of the wrong type, is a one-line ConfigError.
  """
  values = dict(known)
  for item in filter(None, (arg or "").split(",")):
    key, has_value, text = item.partition("=")
    if key not in known:
      raise ConfigError(f"config argument {key!r} is not one of {sorted(known)}")
    values[key] = _parse_value(key, text if has_value else None, known[key])
  return values


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _parse_value(key, text, default):
  if isinstance(default, bool):
    if text is None or text.lower() in _BOOLEANS:
      return True if text is None else _BOOLEANS[text.lower()]
  elif text is None:
    pass  # a bare key is only a switch for a boolean argument
  elif isinstance(default, int | float):
    try:
      return type(default)(text)
    except ValueError:
      pass
  else:
    return text
  raise ConfigError(
    f"config argument {key}={text!r} must be a {type(default).__name__} (default {default!r})"
  )


def _positive(config, *names):
  for name in names:
    value = config
    for part in name.split("."):
      value = value[part]
    if not isinstance(value, (int, float)) or value <= 0:
      raise ConfigError(f"config.{name}={value!r} must be a positive number")


def check(config: mc.ConfigDict) -> mc.ConfigDict:
  """Checks what would otherwise fail deep inside a run; returns a checked copy, so the
  caller's object is never changed by a run."""
  config = mc.ConfigDict(config.to_dict())
  _positive(
    config,
    "total_steps",
    "batch_size",
    "log_every",
    "checkpoint_every",
    "optim.lr",
    "optim.decay_steps",
    "optim.decay_rate",
    "model.width",
    "loss.temperature",
  )
  if config.eval_every < 0:
    raise ConfigError(f"config.eval_every={config.eval_every} must be >= 0")
  modalities = tuple(config.modalities)
  if not modalities or len(set(modalities)) != len(modalities):
    raise ConfigError(f"config.modalities={modalities!r} must be distinct names, at least one")
  missing = [m for m in modalities if m not in config.data.norm]
  if missing:
    raise ConfigError(
      f"config.data.norm has no intensity normalisation for {missing}; "
      f"add e.g. --config.data.norm.{missing[0]}=..."
    )
  for field, allowed in (
    ("loss.kd_distance", ("kl", "l2")),
    ("loss.kd_absent", ("mask", "uniform")),
    ("loss.l2_scope", ("kernels", "all")),
  ):
    section, name = field.split(".")
    if config[section][name] not in allowed:
      raise ConfigError(f"config.{field}={config[section][name]!r} must be one of {allowed}")
  if not 0.0 < config.data.train_fraction <= 1.0:
    raise ConfigError(f"config.data.train_fraction={config.data.train_fraction} must be in (0, 1]")
  return config


def resolve(config, *, root: str, num_classes: int) -> mc.FrozenConfigDict:
  """The config a run (and its checkpoints) uses: checked, with what the dataset decided
  filled in (the dataset root, e.g. generated phantoms, and the class count), and frozen.

  Everything below training and inference reads this one immutable object; nothing may
  change it halfway, so the config saved with a checkpoint is the one the run used.
  """
  resolved = check(config)
  resolved.data.root = str(root)
  resolved.model.num_classes = int(num_classes)
  return mc.FrozenConfigDict(resolved)


def frozen(saved: dict) -> mc.FrozenConfigDict:
  """A config saved with a checkpoint (already resolved), checked and frozen again."""
  return mc.FrozenConfigDict(check(mc.ConfigDict(saved)))
