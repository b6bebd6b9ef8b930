"""Left and right kept apart under mirroring.

A flip along the patient's left-right axis turns a left kidney into something that looks like
a right one.  Trained on such flips with the labels unchanged, a network learns that a kidney
is 'left' or 'right' at random (MRSegmentator 1.0 confused left and right organs this way, and
was retrained without mirroring); predicting with mirrored test-time augmentation averages a
left kidney's probabilities with the right's.  So each dataset names its (left, right) class
pairs (`Adapter.lateral_pairs`, by class name), and a flip along that axis swaps the pair's
labels in training (`ukd.data.pipeline`) and the pair's probabilities of a mirrored
prediction before it is averaged (`ukd.serve.segmenter`).

The pairs travel as class indices in the resolved config (`data.lateral_pairs`, set by
`ukd.config.resolve` from `pair_indices`), so training, the checkpoint and every later
prediction use the same table, never re-derived from names.  A dataset whose class names say
left or right without a partner in the table cannot be mirrored along that axis:
`check_flip` refuses it in one line before anything is prepared.
"""

from __future__ import annotations

import dataclasses
import re

from ukd.errors import ConfigError, DataError

# Canonical volumes are RAS (`ukd.data.io.volumes`): axis 0 runs along the patient's
# left-right.  Network space moves `data.slice_axis` last and keeps the other two in order.
_RAS_LEFT_RIGHT = 0
_SIDE = re.compile(r"(?<![a-z])(left|right)(?![a-z])", re.IGNORECASE)


def lateral_axis(slice_axis: int) -> int:
  """The data axis (0, 1 in-plane, 2 along the slices) that runs along the patient's left-right:
  axis 0 for axial or coronal slices, the slice axis (2) for sagittal ones."""
  return 2 if int(slice_axis) == _RAS_LEFT_RIGHT else 0


def is_lateral(name: str) -> bool:
  """Whether a class name says left or right as a word ('left_kidney', 'kidney_left', 'Right
  adrenal gland'; not 'LVC' or 'bright')."""
  return _SIDE.search(name) is not None


def pairs_by_name(classes) -> tuple[tuple[str, str], ...]:
  """(left, right) pairs among `classes` whose names differ only by the word left/right:
  ('kidney_left', 'kidney_right'); a class without its partner is in no pair."""
  present = set(classes)
  pairs = []
  for name in classes:
    side = _SIDE.search(name)
    if side and side.group(1).lower() == "left":
      partner = name[: side.start()] + _right_as(side.group(1)) + name[side.end() :]
      if partner in present:
        pairs.append((name, partner))
  return tuple(pairs)


def _right_as(left: str) -> str:
  """'right' written in the case of `left` ('Left' -> 'Right', 'LEFT' -> 'RIGHT')."""
  if left.isupper():
    return "RIGHT"
  return "Right" if left[0].isupper() else "right"


def pair_indices(classes, pairs) -> tuple[tuple[int, int], ...]:
  """A dataset's (left, right) name pairs as class indices; a name not among `classes` or in
  two pairs is a DataError (the table is wrong, not the data)."""
  classes = list(classes)
  indices, seen = [], set()
  for pair in pairs:
    for name in pair:
      if name not in classes:
        raise DataError(f"lateral pair {pair}: {name!r} is not one of the classes {classes}")
      if name in seen:
        raise DataError(f"lateral pairs: class {name!r} is in two pairs")
      seen.add(name)
    indices.append(tuple(classes.index(name) for name in pair))
  return tuple(indices)


def check_flip(classes, pairs, flip_axes, slice_axis: int, dataset: str) -> None:
  """Refuses a flip along the patient's left-right axis where a class that says left or right
  has no partner in the dataset's pair table: its mirror image would keep its side's label."""
  axis = lateral_axis(slice_axis)
  if axis not in flip_axes:
    return
  paired = {name for pair in pairs for name in pair}
  lone = [name for name in classes if is_lateral(name) and name not in paired]
  if lone:
    raise ConfigError(
      f"config.data.augment.flip={tuple(flip_axes)} mirrors axis {axis}, the patient's "
      f"left-right, but class {lone[0]!r} of dataset {dataset!r} has no left/right partner in "
      f"its pair table: drop axis {axis} from data.augment.flip"
    )


@dataclasses.dataclass(frozen=True)
class Mirror:
  """What a flip along the patient's left-right does to class indices: `swap[k]` is the class
  that class k's mirror image belongs to (its pair's other class; itself outside pairs)."""

  axis: int  # data axis along the patient's left-right (`lateral_axis`)
  swap: tuple[int, ...]

  def affects(self, axes) -> bool:
    """Whether mirroring `axes` swaps sides: an odd number of flips along `axis` (one, as
    flipped axes are distinct)."""
    return self.axis in tuple(axes)


def mirror_of(config) -> Mirror | None:
  """The resolved config's pair table (`data.lateral_pairs`, class indices) as a `Mirror`;
  None without pairs (nothing to swap), as in configs saved before the table existed."""
  pairs = [tuple(int(i) for i in pair) for pair in config.data.get("lateral_pairs", ())]
  if not pairs:
    return None
  count = int(config.model.num_classes)
  flat = [i for pair in pairs for i in pair]
  if (
    any(len(p) != 2 for p in pairs)
    or len(set(flat)) != len(flat)
    or not all(0 < i < count for i in flat)
  ):
    raise ConfigError(
      f"config.data.lateral_pairs={pairs} must be (left, right) pairs of distinct class "
      f"indices in 1..{count - 1}"
    )
  swap = list(range(count))
  for left, right in pairs:
    swap[left], swap[right] = right, left
  return Mirror(lateral_axis(config.data.slice_axis), tuple(swap))
