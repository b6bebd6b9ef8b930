"""What every dataset adapter shares: the `Case` record, the `Adapter` base class, label-code
mapping and the folder-listing helpers the layouts use.

Layout problems (missing folders, unpaired files, unknown label codes) raise `DataError`
rather than skipping cases: a silently smaller training set is hard to notice later.

A root may be local or on an object store (`gs://bucket/data`): folders are listed through
`etils.epath`, case paths are strings joined with '/', which serves both, and the readers
fetch a remote file to a local temporary one (`ukd.files.local_file`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable

import numpy as np
from etils import epath

from ukd.data.io.volumes import Volume, read_image, read_label
from ukd.errors import DataError, error

_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class Case:
  """One labelled volume: identity and where its files are; nothing is loaded yet."""

  id: str
  modality: str
  image: str
  label: str | None


class Adapter:
  """One dataset layout; subclasses set `classes` and implement `cases` and `read`.

  `code_table(modality)` maps the raw codes of a modality's annotations to class indices (by
  default the codes are the indices); `label_codes(modality)` goes back, giving the code a
  prediction writes for each class index, so predicted files read like the dataset's own.
  `ignore_unknown_labels=True` maps label codes the adapter does not know to background
  instead of failing, for datasets with stray annotation codes.  `labelled(modality)` names
  the classes a modality's labels hold, when they hold only some (BTCV CT labels 13 organs,
  CHAOS MR 4): training then never reads a missing organ as background
  (`ukd.train.losses`), and evaluation scores only what the references hold.
  `lateral_pairs` names the (left, right) class pairs that a flip along the patient's
  left-right axis swaps (`ukd.data.lateral`); a class whose name says left or right and is in
  no pair makes that flip a one-line error.
  """

  classes: tuple[str, ...] = ("background",)
  lateral_pairs: tuple[tuple[str, str], ...] = ()

  def __init__(self, *, ignore_unknown_labels: bool = False):
    self.ignore_unknown_labels = bool(ignore_unknown_labels)

  @property
  def phantom_options(self) -> dict:
    """What the phantom generator must write beyond its layout's default for this adapter to
    find every case it lists (`ukd.data.synthetic.generate.ensure`); by default nothing."""
    return {}

  def cases(self, root: str) -> list[Case]:
    """All labelled cases of every modality under `root`."""
    raise NotImplementedError

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    """Image (float32) and label (class indices) of a case, both canonical."""
    raise NotImplementedError

  def code_table(self, modality: str) -> dict[int, int]:
    """Raw label code -> class index for `modality`; codes not in it are unknown."""
    return {index: index for index in range(len(self.classes))}

  def labelled(self, modality: str) -> tuple[str, ...]:
    """The names of the classes `modality`'s labels hold; by default every class."""
    return self.classes

  def held_codes(self, modality: str) -> dict[int, int]:
    """{class index: code} of the classes `modality`'s labels hold: the one code `code_table`
    maps to each (0 for background, whatever else the table sends there).  Tables that map
    several codes to one class (value ranges) override this with their nominal codes."""
    table = self.code_table(modality)
    held = set(self.labelled(modality))
    codes = {0: 0}
    for index, name in enumerate(self.classes):
      if index and name in held:
        found = [code for code, to in table.items() if to == index]
        if len(found) != 1:
          raise ValueError(f"{type(self).__name__}: class {index} has codes {found}, not one")
        codes[index] = found[0]
    return codes

  def label_codes(self, modality: str) -> tuple[int, ...]:
    """The code written for class index 0..C-1 (`held_codes`).  Predictions carry every class,
    also those this modality's labels lack: such a class takes the code another modality gives
    it, or where this modality already writes that code, the next one above every code used,
    so that no two classes share a code."""
    codes = self.held_codes(modality)
    for other in getattr(self, "modalities", ()):
      for index, code in self.held_codes(other).items():
        if index not in codes and code not in codes.values():
          codes[index] = code
    free = max(codes.values()) + 1
    for index in range(len(self.classes)):
      if index not in codes:
        codes[index], free = free, free + 1
    return tuple(codes[index] for index in range(len(self.classes)))

  def _read_nifti(self, case: Case):
    """Shared NIfTI path: label geometry checked against its image, codes mapped."""
    image = read_image(case.image)
    if case.label is None:
      return image, None
    label = read_label(case.label, like=image)
    lookup = self.code_table(case.modality).get
    return image, map_labels(label, lookup, self.ignore_unknown_labels)


def map_labels(
  label: Volume, lookup: Callable[[int], int | None], ignore_unknown: bool = False
) -> Volume:
  """Replace raw label codes by class indices; `lookup` returns None for unknown codes."""
  codes, inverse = np.unique(label.array, return_inverse=True)
  indices = [lookup(int(code)) for code in codes]
  unknown = [int(code) for code, index in zip(codes, indices) if index is None]
  if unknown and not ignore_unknown:
    raise error(
      DataError,
      label.source,
      f"unknown label codes {unknown}; set ignore_unknown_labels=True to treat them as background",
    )
  table = np.array([0 if index is None else index for index in indices], np.int32)
  mapped = table[inverse].reshape(label.array.shape)
  return dataclasses.replace(label, array=mapped)


# ----------------------------------------------------------------------------------------
# Listing helpers
# ----------------------------------------------------------------------------------------


def require_dir(path: str, what: str) -> str:
  """`path` if it is a folder, else a DataError saying which `what` is missing."""
  if not epath.Path(path).is_dir():
    raise error(DataError, path, f"{what} not found")
  return path


def visible(folder: str) -> list[str]:
  """Entries of a folder without hidden files (.DS_Store and the like)."""
  return sorted(p.name for p in epath.Path(folder).iterdir() if not p.name.startswith("."))


def match_files(folder: str, pattern: str) -> dict[str, str]:
  """{key: path} for NIfTI files in `folder` whose stem fully matches `pattern` (group 1).

  NIfTI files with other names are errors: they are probably cases under a name this
  adapter does not expect, and skipping them would shrink the dataset unnoticed.
  """
  found = {}
  for name in visible(require_dir(folder, "folder")):
    nifti = _NIFTI.match(name)
    if nifti is None:
      continue
    key = re.fullmatch(pattern, nifti.group("stem"))
    if key is None:
      raise error(
        DataError, os.path.join(folder, name), f"unexpected file name (expected {pattern})"
      )
    if key.group(1) in found:
      raise error(DataError, os.path.join(folder, name), f"same case as {found[key.group(1)]}")
    found[key.group(1)] = os.path.join(folder, name)
  return found


def pair_cases(images: dict[str, str], labels: dict[str, str], modality: str, where: str, make_id):
  """Cases from {key: path} dicts; an image without label (or vice versa) is an error."""
  for key, path in images.items():
    if key not in labels:
      raise error(DataError, path, "image has no matching label file")
  for key, path in labels.items():
    if key not in images:
      raise error(DataError, path, "label has no matching image file")
  if not images:
    raise error(DataError, where, f"no {modality} cases found")
  return [Case(make_id(key), modality, images[key], labels[key]) for key in sorted(images)]


def check_modalities(modalities, allowed: tuple[str, ...], adapter: str) -> tuple[str, ...]:
  """An adapter's `modalities` option as a tuple: at least one, each one of `allowed`."""
  modalities = tuple(modalities)
  if not modalities or any(m not in allowed for m in modalities):
    raise error(DataError, f"{adapter} option modalities={modalities}", f"choose from {allowed}")
  return modalities


def require_root(root) -> str:
  """The dataset root as a string path; it must be an existing folder."""
  root = os.fspath(root)
  return require_dir(root, "dataset root")
