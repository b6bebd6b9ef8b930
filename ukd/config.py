"""The default configuration every config file builds on, and its validation.

Configs are data: a `configs/<name>.py` file returns `default()` with some fields
changed.  Every field is documented here in one line.  Fields a user must set
hold a placeholder (ml_collections cannot override a field that is None).
"""

import re

import ml_collections as mc
import numpy as np

from ukd.config_fields import (
  check_modality_names,
  flip_axes,
  label_sets,
  spacing_for,
)
from ukd.data import lateral
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
  c.model.conv_grads = "xla"  # 'xla' | 'cpu_matmul' (custom matmul gradients, faster on CPU)
  c.model.head_bias = False  # a bias on the logits' convolution (reference: 2D none, 3D one)
  c.model.pad = "zeros"  # 2D: 'zeros' | 'reference' (its last two convolutions pad by mirroring)
  c.model.x_split = 2  # x_shape: per-modality stages at each end (encoder and decoder), 1..3

  c.loss = mc.ConfigDict()
  c.loss.dice = 1.0  # weight of the soft Dice loss (per modality)
  c.loss.ce = 1.0  # weight of the class-weighted cross-entropy
  c.loss.kd = 0.5  # weight of the KD loss (schemes with kd only)
  c.loss.temperature = 2.0  # KD softmax temperature
  c.loss.kd_distance = "kl"  # 'kl' (symmetric KL) or 'l2'
  c.loss.kd_grad_share = False  # log KD's share of the gradient norm (a second backward pass)
  c.loss.kd_absent = "mask"  # class absent from a modality's batch: 'mask' | 'uniform' (reference)
  c.loss.l2 = 1e-4  # weight of 1/2 sum of squares of the parameters in l2_scope
  c.loss.l2_scope = "kernels"  # 'kernels' (2D reference) or 'all' parameters (3D reference)

  c.optim = mc.ConfigDict()
  c.optim.lr = 1e-3  # Adam learning rate
  c.optim.decay_rate = 0.95  # multiply the rate by this ...
  c.optim.decay_steps = 1000  # ... every this many steps
  c.optim.eps = 1e-8  # Adam epsilon (TensorFlow's and optax's default)

  c.data = mc.ConfigDict()
  c.data.dataset = "mmwhs"  # adapter: mmwhs | abdominal | folder | amos | totalseg
  c.data.root = REQUIRED  # dataset root directory (local or gs://bucket/path)
  c.data.options = mc.ConfigDict()  # adapter options (e.g. folder: modalities={...})
  c.data.structures = ""  # totalseg: mask files to train, 'liver,kidney_left,...' (class order)
  c.data.lateral_pairs = ()  # (left, right) class indices a left-right flip swaps (set from data)
  c.data.synthetic = mc.ConfigDict()  # phantoms generated into the root on first use
  c.data.synthetic.enabled = False  # generate (root '' or unset: <workdir>/phantoms)
  c.data.synthetic.n_ct = 10  # CT cases
  c.data.synthetic.n_mr = 10  # MR cases
  c.data.synthetic.seed = 0  # phantoms' own seed (the same phantoms for every training seed)
  c.data.synthetic.shape = (96, 96, 40)  # voxels per phantom
  c.data.synthetic.realism = "simple"  # 'simple' (the demo's) | 'scanner' (MM-WHS protocols; mmwhs)
  # folder layout: {modality: phantom contrast} ('ct' | 'mr' | scanner set: 'mr_t2'); a
  # modality named ct or mr holds that contrast unless named here
  c.data.synthetic.contrasts = {}
  c.data.split_fractions = (0.6, 0.2, 0.2)  # train / val / test fractions per modality
  c.data.folds = 1  # k > 1: k-fold cross-validation of the train+val cases; test stays as k=1
  c.data.fold = 0  # with folds > 1: the fold validated on (0..folds-1), the others train
  c.data.patient_pattern = ""  # regex, group 1 = a case id's patient ('': each case its own)
  # Share of each modality's training cases used (data budget): '0.25' | 'ct=1,mr=0.25'.
  c.data.train_fraction = "1"
  c.data.split_file = ""  # a splits.json to use instead of a seeded split
  # Classes each modality's labels hold, by name: 'mr=MYO+LVC' ('' = all the dataset gives).
  c.data.labelled = ""
  c.data.label_sets = {}  # set by resolve: {modality: class indices} of partly labelled ones
  c.data.cache_dir = ""  # volume cache ('' = <workdir>/cache); gs://... -> ~/.cache/ukd/<hash>
  c.data.size = (256, 256)  # in-plane size the network sees
  c.data.spacing = ""  # in-plane mm ('': resize to size): '1' | '1x0.8' (rows x cols) | 'ct=1,mr=2'
  c.data.slice_axis = 2  # canonical (RAS) axis along which slices are taken
  c.data.crop = "none"  # none | body (a box found from the image): in-plane crop before resize
  c.data.crop_margin = 8  # voxels kept around the crop box
  c.data.norm = mc.ConfigDict()  # per-modality intensity normalisation
  c.data.norm.ct = dict(kind="window", window=(-1000.0, 1000.0))
  c.data.norm.mr = dict(kind="zscore", percentiles=(0.5, 99.5))
  c.data.patch = (256, 256, 8)  # 3D patch (H, W, S)
  c.data.fg_fraction = 0.0  # probability of sampling a slice/patch with foreground
  c.data.augment = mc.ConfigDict()  # all off by default, as in the paper
  c.data.augment.flip = ()  # axes flipped at random: (0, 1) in-plane, 2 the slice axis too
  c.data.augment.rotate = 0.0  # max rotation in degrees
  c.data.augment.scale = 0.0  # max relative zoom (0.1 = 0.9..1.1)
  c.data.augment.intensity = 0.0  # max intensity scale/shift jitter
  c.data.workers = 2  # grain worker processes (0 = in-process)
  c.data.prefetch = 4  # batches buffered per worker

  c.infer = mc.ConfigDict()
  c.infer.batch_size = 32  # slices (2D) or windows (3D) per device call
  c.infer.overlap = 0.5  # sliding-window overlap (3D; 2D in-plane where slices exceed data.size)
  c.infer.tta = False  # mirroring test-time augmentation over data.augment.flip's axes
  c.infer.dicom_modalities = {"CT": "ct", "MR": "mr"}  # DICOM Modality tag -> modality predicted
  # {modality: regex}: an MR series is the modality whose regex its SeriesDescription,
  # ScanningSequence or SequenceName matches (ignoring case); {}: MR goes by dicom_modalities.
  c.infer.dicom_sequences = {}

  c.log_every = 50  # steps between metric lines
  c.eval_every = 1000  # steps between validations (0 = only at the end)
  c.checkpoint_every = 1000  # steps between checkpoints (and at the end)
  c.keep_best = 1  # best checkpoints kept (by validation mean Dice)
  c.overlays = 1  # overlay pictures per modality at each validation; test evaluation: all, 0: none
  c.profile = (0, 0)  # (first_step, num_steps): jax.profiler trace into <workdir>/profile/; 0: off
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


def _check_counts(config, name: str, length: int | None = None) -> None:
  """`config.<name>` is a whole number >= 0 (`length` given: a tuple of that many)."""
  value = config[name]
  values = tuple(value) if length else (value,)
  if (length and len(values) != length) or not all(isinstance(v, int) and v >= 0 for v in values):
    what = f"{length} whole numbers >= 0" if length else "a whole number >= 0"
    raise ConfigError(f"config.{name}={value!r} must be {what}")


# What each kind of `data.norm.<modality>` needs besides 'kind': 'window' clips to (low, high)
# and scales to [-1, 1]; 'zscore' clips at the (low, high) percentiles, then standardises.
NORM_FIELDS = {"window": "window", "zscore": "percentiles"}


def _check_norm(config, modality: str) -> None:
  """One modality's intensity normalisation: a known kind and its (low, high) pair."""
  name = f"config.data.norm.{modality}"
  entry = config.data.norm[modality]
  kind = entry.get("kind") if isinstance(entry, mc.ConfigDict) else None
  if kind not in NORM_FIELDS:
    raise ConfigError(f"{name}.kind={kind!r} must be one of {tuple(NORM_FIELDS)}")
  field = NORM_FIELDS[kind]
  if field not in entry:
    raise ConfigError(f"{name} of kind {kind!r} needs {field}=(low, high)")
  try:
    low, high = (float(v) for v in entry[field])
  except (TypeError, ValueError):
    raise ConfigError(f"{name}.{field}={entry[field]!r} must be two numbers (low, high)") from None
  bounds = "0 <= low < high <= 100" if field == "percentiles" else "low < high"
  if not low < high or (field == "percentiles" and (low < 0.0 or high > 100.0)):
    raise ConfigError(f"{name}.{field}={(low, high)} must satisfy {bounds}")


def check(config: mc.ConfigDict) -> mc.ConfigDict:
  """Checks what would otherwise fail deep inside a run; returns a checked copy, so the
  caller's object is never changed by a run.  `data.augment.flip` comes back as the sorted
  axes it names (`flip_axes`), the one form the pipeline and the Segmenter read."""
  raw = config.to_dict()
  # A list: FrozenConfigDict refuses one tuple object met twice, and () is a single object.
  raw["data"]["augment"]["flip"] = list(flip_axes(raw["data"]["augment"]["flip"]))
  config = mc.ConfigDict(raw)
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
    "infer.batch_size",
  )
  _check_counts(config, "overlays")  # True / False in configs saved before it was a count
  _check_counts(config, "profile", length=2)
  if config.profile[1] and config.profile[0] < 1:
    raise ConfigError(f"config.profile={tuple(config.profile)}: steps count from 1")
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
  for modality in modalities:
    _check_norm(config, modality)
  check_modality_names(config, "spacing", modalities)
  for field, allowed in (
    ("loss.kd_distance", ("kl", "l2")),
    ("loss.kd_absent", ("mask", "uniform")),
    ("loss.l2_scope", ("kernels", "all")),
    ("model.pad", ("zeros", "reference")),
    ("data.crop", ("none", "body")),
  ):
    section, name = field.split(".")
    if config[section][name] not in allowed:
      raise ConfigError(f"config.{field}={config[section][name]!r} must be one of {allowed}")
  conv_grads = config.model.get("conv_grads", "xla")  # configs saved with older checkpoints: none
  if conv_grads not in ("xla", "cpu_matmul"):
    raise ConfigError(f"config.model.conv_grads={conv_grads!r} must be 'xla' or 'cpu_matmul'")
  from ukd import models  # here: reading and writing configs needs no network code

  models.check_x_split(config.model)
  check_modality_names(config, "train_fraction", modalities)
  _check_planes(config.data)
  check_modality_names(config, "labelled", modalities)
  lateral.mirror_of(config)  # a saved or hand-set pair table fits the classes
  _check_folds(config.data)
  _check_realism(config.data)
  if not 0.0 <= config.infer.overlap < 1.0:
    raise ConfigError(f"config.infer.overlap={config.infer.overlap} must be in [0, 1)")
  _check_sequences(config.infer.get("dicom_sequences") or {}, modalities)
  return config


def _check_sequences(sequences, modalities) -> None:
  """`infer.dicom_sequences`: {modality: regex}, each a modality the run trains and a regex
  that compiles, so a bad pattern fails when the config is read, not at the first series."""
  for modality, pattern in dict(sequences).items():
    if modality not in modalities:
      raise ConfigError(
        f"config.infer.dicom_sequences names modality {modality!r}, not one of {modalities}"
      )
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(
        f"config.infer.dicom_sequences.{modality}={pattern!r} is not a regex ({e})"
      ) from None


def _check_planes(data) -> None:
  """The in-plane size, slice axis and crop margin every volume is prepared with."""
  size = tuple(data.size)
  if len(size) != 2 or not all(isinstance(v, int) and v >= 1 for v in size):
    raise ConfigError(f"config.data.size={size} must be two positive ints (H, W)")
  if data.slice_axis not in (0, 1, 2):
    raise ConfigError(f"config.data.slice_axis={data.slice_axis!r} must be 0, 1 or 2")
  if not (isinstance(data.crop_margin, int) and data.crop_margin >= 0):
    raise ConfigError(f"config.data.crop_margin={data.crop_margin!r} must be an int >= 0")


def _check_realism(data) -> None:
  """`data.synthetic.realism`: a phantom set (`ukd.data.synthetic.generate`) that the dataset has."""
  realism = data.synthetic.realism
  if realism not in ("simple", "scanner"):
    raise ConfigError(
      f"config.data.synthetic.realism={realism!r} must be one of ('simple', 'scanner')"
    )
  if realism == "scanner" and data.synthetic.enabled and data.dataset not in ("mmwhs", "folder"):
    raise ConfigError(
      f"config.data.synthetic.realism='scanner' has cardiac phantoms only: it needs "
      f"data.dataset='mmwhs' or 'folder', not {data.dataset!r}"
    )
  contrasts = dict(data.synthetic.get("contrasts") or {})
  if contrasts and data.dataset != "folder":
    raise ConfigError(
      f"config.data.synthetic.contrasts={contrasts} names phantom contrasts per modality, "
      f"which only the 'folder' layout writes, not {data.dataset!r}"
    )
  from ukd.data.synthetic import phantoms, scanner_phantoms  # the phantom sets' contrasts

  known = scanner_phantoms.CONTRASTS if realism == "scanner" else phantoms.MODALITIES
  for modality, contrast in contrasts.items():
    if contrast not in known:
      raise ConfigError(
        f"config.data.synthetic.contrasts.{modality}={contrast!r} must be one of {known} "
        f"(data.synthetic.realism={realism!r})"
      )


def _check_folds(data) -> None:
  """`data.folds`, `data.fold` and `data.patient_pattern` (`ukd.data.splits`)."""
  folds, fold = data.folds, data.fold
  if not isinstance(folds, int) or isinstance(folds, bool) or folds < 1:
    raise ConfigError(f"config.data.folds={folds!r} must be a whole number >= 1")
  if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < folds:
    raise ConfigError(f"config.data.fold={fold!r} must be a whole number in 0..{folds - 1}")
  if folds > 1 and data.split_file:
    raise ConfigError("config.data.folds > 1 makes the split itself: leave data.split_file empty")
  try:
    groups = re.compile(data.patient_pattern).groups
  except (re.error, TypeError):
    groups = None
  if data.patient_pattern and not groups:
    raise ConfigError(
      f"config.data.patient_pattern={data.patient_pattern!r} must be a regex with a group "
      "(the patient part of a case id)"
    )


def preprocessing(config) -> dict:
  """{modality: `preprocess.Preprocessing`} of a checked config: the per-modality strings
  (`data.spacing`, `data.norm`) parsed once, so the data and serving code take values."""
  from ukd.data.preprocess import Preprocessing  # here: the config loads without numpy

  data = config.data
  return {
    m: Preprocessing(
      size=tuple(int(v) for v in data.size),
      slice_axis=int(data.slice_axis),
      crop=data.crop,
      crop_margin=int(data.crop_margin),
      norm=plain(data.norm[m]),
      spacing=_floats(spacing_for(data.get("spacing", ""), m)),
    )
    for m in config.modalities
  }


def _floats(values) -> tuple[float, ...] | None:
  return None if values is None else tuple(float(v) for v in values)


def resolve(config, *, root: str, classes, held=None, lateral_pairs=()) -> mc.FrozenConfigDict:
  """The config a run (and its checkpoints) uses: checked, with what the dataset decided
  filled in (the dataset root, e.g. generated phantoms, the class count, the label sets and the (left, right)
  class-index pairs that `ukd.data.lateral` swaps under a left-right flip), and frozen.

  Everything below training and inference reads this one immutable object; nothing may
  change it halfway, so the config saved with a checkpoint is the one the run used.

  Args:
    config: the run's config.
    root: the dataset root.
    classes: the network's class names, background first (the adapter's).
    held: {modality: class names its references hold} as the dataset says (the adapter's
      `labelled`); a modality it leaves out holds every class.
  """
  resolved = check(config)
  resolved.data.root = str(root)
  resolved.model.num_classes = len(classes)
  resolved.data.label_sets = label_sets(
    resolved.data.labelled, tuple(classes), dict(held or {}), tuple(resolved.modalities)
  )
  resolved.data.lateral_pairs = [[int(left), int(right)] for left, right in lateral_pairs]
  return mc.FrozenConfigDict(resolved)


def label_masks(config) -> dict[str, np.ndarray]:
  """{modality: [num_classes] booleans, the classes its labels hold} of the modalities whose
  labels hold only some classes (`data.label_sets`); the others are left out."""
  sets = config.data.get("label_sets") or {}  # configs saved before label sets have none
  masks = {}
  for modality, indices in sets.items():
    mask = np.zeros(config.model.num_classes, bool)
    mask[list(indices)] = True
    masks[modality] = mask
  return masks


# The config's mappings whose keys the user names (modalities, an adapter's options), not
# fields of ours: a study's overrides may add keys to them.
OPEN_MAPPINGS = (
  "data.options",
  "data.norm",
  "data.synthetic.contrasts",
  "infer.dicom_modalities",
  "infer.dicom_sequences",
)

# Fields added to `default()` with a default that differs from what runs saved before them
# did, and that older behaviour: a config saved without the field takes this value, so its
# checkpoint still fits the network it builds (both networks' heads had a bias).
BEFORE_FIELDS = {"model": {"head_bias": True}}


def frozen(saved: dict) -> mc.FrozenConfigDict:
  """A config saved with a checkpoint (already resolved), checked and frozen again; fields
  added to `default()` since the checkpoint was saved take their former behaviour
  (`BEFORE_FIELDS`) or else their default values."""
  filled = _with_defaults(_with_defaults(saved, BEFORE_FIELDS), default().to_dict())
  return mc.FrozenConfigDict(check(mc.ConfigDict(filled)))


def _with_defaults(saved: dict, defaults: dict) -> dict:
  """`saved` with every field it lacks taken from `defaults`, section by section."""
  merged = dict(saved)
  for key, value in defaults.items():
    if key not in merged:
      merged[key] = value
    elif isinstance(value, dict) and isinstance(merged[key], dict):
      merged[key] = _with_defaults(merged[key], value)
  return merged


def plain(value):
  """A config or part of one as plain, JSON-stable data: ConfigDicts as dicts with sorted
  string keys, tuples as lists, numpy scalars as numbers (cache keys hash this form)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): plain(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value
