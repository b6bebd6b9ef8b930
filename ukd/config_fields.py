"""The config's compact fields parsed into values, once.

A per-modality `data` field is one string, because ml_collections cannot set a field that is
None from the command line, and one string holds both forms: 'V' for every modality and
'ct=V,mr=V' (`data.spacing`, `data.train_fraction`, `data.labelled`).  `data.augment.flip`
names axes.  `ukd.config.check` checks them through these parsers and `resolve` turns them
into the values the data, training and serving code take (`ukd.config.preprocessing`).
"""

import math

from ukd.errors import ConfigError


def _modality_entries(text, field: str, forms: str, value) -> dict:
  """A per-modality setting as {modality: value}, the key None standing for every modality;
  {} when unset.  A string, because a field that is None cannot be set from the command line,
  and one string holds both forms: 'V' for every modality and 'ct=V,mr=V'.  `value` parses
  one V (ValueError when it is not one); `forms` is the usage the error shows."""
  usage = f"config.{field}={text!r} must be {forms}"
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    text = repr(float(text))  # configs written when the field was a number
  if not isinstance(text, str):
    raise ConfigError(usage)
  items = [item.strip() for item in text.split(",")] if text.strip() else []
  entries = {}
  for item in items:
    name, named, written = item.rpartition("=")
    key = name.strip() if named else None
    try:
      entries_value = value(written)
    except ValueError:
      raise ConfigError(usage) from None
    if key == "" or key in entries or (key is None and len(items) > 1):
      raise ConfigError(usage)
    entries[key] = entries_value
  return entries


def _spacing_pair(text: str) -> tuple[float, float]:
  pair = tuple(float(v) for v in text.lower().split("x"))
  pair = pair * 2 if len(pair) == 1 else pair
  if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
    raise ValueError(text)
  return pair


def _fraction(text: str) -> float:
  fraction = float(text)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(text)
  return fraction


# The per-modality `data` fields: the forms the error shows, and the parser of one value.
def _class_names(text: str) -> tuple[str, ...]:
  names = tuple(name.strip() for name in text.split("+"))
  if not all(names) or len(set(names)) != len(names):
    raise ValueError(text)
  return names


_PER_MODALITY = {
  "spacing": (
    "'' (off), 'MM', 'ROWSxCOLS' or 'ct=MM,mr=ROWSxCOLS' with positive numbers (mm)",
    _spacing_pair,
  ),
  "train_fraction": ("'F' or 'ct=F,mr=F' with each F in (0, 1]", _fraction),
  "labelled": (
    "'' (every class), 'A+B' or 'ct=A+B,mr=C' with distinct class names",
    _class_names,
  ),
}


def labelled_entries(text) -> dict:
  """`data.labelled` as {modality (None: every one): the class names it labels}."""
  return _data_entries("labelled", text)


def _data_entries(name: str, text) -> dict:
  forms, value = _PER_MODALITY[name]
  return _modality_entries(text, f"data.{name}", forms, value)


def _spacing_entries(text: str) -> dict:
  """`data.spacing` as {modality: (rows, cols)}: '1', '1x0.8' and 'ct=1,mr=1.2x1'."""
  return _data_entries("spacing", text)


def train_fraction_for(text, modality: str) -> float:
  """The share of `modality`'s training cases that `data.train_fraction` ('0.25' or
  'ct=1,mr=0.25'; a modality it does not name keeps all) trains on."""
  entries = _data_entries("train_fraction", text)
  return entries.get(modality, entries.get(None, 1.0))


def spacing_for(text: str, modality: str) -> tuple[float, float] | None:
  """The in-plane spacing (rows, cols of the slice-last in-plane axes, mm) that `data.spacing`
  asks of `modality`; None when unset (slices are resized to `data.size` instead)."""
  entries = _spacing_entries(text)
  if not entries:
    return None
  if None in entries:
    return entries[None]
  if modality not in entries:
    raise ConfigError(f"config.data.spacing={text!r} gives no spacing for modality {modality!r}")
  return entries[modality]


def check_modality_names(config, name: str, modalities) -> None:
  """A per-modality `data.<name>` parses and names only modalities the run trains."""
  text = config.data.get(name, "")  # configs saved with older checkpoints may have none
  unknown = [m for m in _data_entries(name, text) if m not in (None, *modalities)]
  if unknown:
    raise ConfigError(
      f"config.data.{name}={text!r} names modality {unknown[0]!r}, not one of {modalities}"
    )
  if name == "spacing":
    for modality in modalities:
      spacing_for(text, modality)


def flip_axes(value) -> tuple[int, ...]:
  """`data.augment.flip` as sorted data axes (0, 1 in-plane, 2 along the slices).  Configs
  saved when the field was a switch hold True (both in-plane axes) or False (none)."""
  if isinstance(value, bool):
    return (0, 1) if value else ()
  try:
    axes = tuple(sorted(int(a) for a in value))
  except (TypeError, ValueError):
    axes = None
  if axes is None or len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
    raise ConfigError(f"config.data.augment.flip={value!r} must be distinct axes among 0, 1, 2")
  return axes


def label_sets(text: str, classes: tuple[str, ...], held: dict, modalities) -> dict:
  """{modality: class indices its labels hold} for the modalities that hold only some of
  `classes`: what the dataset holds (`held`) and, where `data.labelled` (`text`) names a
  modality's classes, only those of them.  Background (index 0) is always in: it is the class
  the losses merge the others into.  Worked out once, here, so that training reads arrays
  (`label_masks`), never names."""
  declared = _data_entries("labelled", text)
  sets = {}
  for modality in modalities:
    names = set(held.get(modality, classes))
    wanted = declared.get(modality, declared.get(None))
    if wanted is not None:
      unknown = [name for name in wanted if name not in classes]
      if unknown:
        raise ConfigError(
          f"config.data.labelled={text!r}: {unknown[0]!r} is not a class of the dataset "
          f"{list(classes)}"
        )
      names &= set(wanted)
    indices = (0, *(k for k, name in enumerate(classes) if k and name in names))
    if len(indices) == 1:
      raise ConfigError(f"modality {modality!r} would train with no labelled class")
    if len(indices) < len(classes):
      sets[modality] = indices
  return sets
