"""Abdominal CT and MR: BTCV CT (NIfTI) and CHAOS MR (T2-SPIR, T1-DUAL in- and out-phase),
the `abdominal` adapter."""

from __future__ import annotations

import os

from etils import epath

from ukd import files
from ukd.data import lateral
from ukd.data.adapters.base import (
  Adapter,
  Case,
  check_modalities,
  map_labels,
  match_files,
  pair_cases,
  require_dir,
  require_root,
  visible,
)
from ukd.data.adapters.registry import register
from ukd.data.io.dicom import read_dicom_series
from ukd.data.io.volumes import Volume
from ukd.errors import DataError, error

ABDOMINAL_CLASSES = ("background", "liver", "right_kidney", "left_kidney", "spleen")

# BTCV: 1 spleen, 2 right kidney, 3 left kidney, 6 liver; 4 gallbladder, 5 esophagus,
# 7 stomach, 8 aorta, 9 IVC, 10 portal/splenic vein, 11 pancreas, 12/13 adrenal glands are
# not annotated in CHAOS and so become background.
BTCV_CODES = {0: 0, 6: 1, 2: 2, 3: 3, 1: 4, **{code: 0 for code in (4, 5, 7, 8, 9, 10, 11, 12, 13)}}

# BTCV's own 13 organs by code (1..13), for `organs='all_ct'`: CT trains all of them.
BTCV_ORGANS = (
  "spleen",
  "right_kidney",
  "left_kidney",
  "gallbladder",
  "esophagus",
  "liver",
  "stomach",
  "aorta",
  "inferior_vena_cava",
  "portal_splenic_vein",
  "pancreas",
  "right_adrenal_gland",
  "left_adrenal_gland",
)
# Which classes each `organs` choice trains: the 4 organs both label, or BTCV's 13 (CHAOS MR
# labels 4 of them; the other 9 MR learns from CT alone).
ORGANS = {"shared": ABDOMINAL_CLASSES, "all_ct": ("background", *BTCV_ORGANS)}

# CHAOS masks nominally use 63/126/189/252 but document value ranges (resampled or
# re-saved PNGs drift); the NIfTI conversions accepted here use the same grey values.
CHAOS_RANGES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))


# The grey values CHAOS nominally gives classes 0..4: what MR predictions are written with.
CHAOS_CODES = (0, 63, 126, 189, 252)


def chaos_class(code: int) -> int | None:
  """CHAOS grey value -> class index (ranges from the CHAOS documentation)."""
  if code == 0:
    return 0
  for low, high, index in CHAOS_RANGES:
    if low <= code <= high:
      return index
  return None


# Masks are 8-bit PNGs (or NIfTI conversions of them): every grey value a mask can hold.
CHAOS_TABLE = {code: chaos_class(code) for code in range(256) if chaos_class(code) is not None}

# CHAOS MR sequences by the name `mr_sequences` gives them: (DICOM folder, mask folder) under
# a patient's folder.  T1-DUAL's two phases are one acquisition, so they share their masks.
CHAOS_SEQUENCES = {
  "T2SPIR": ("T2SPIR/DICOM_anon", "T2SPIR/Ground"),
  "T1DUAL/InPhase": ("T1DUAL/DICOM_anon/InPhase", "T1DUAL/Ground"),
  "T1DUAL/OutPhase": ("T1DUAL/DICOM_anon/OutPhase", "T1DUAL/Ground"),
}


@register("abdominal")
class AbdominalAdapter(Adapter):
  """BTCV CT (NIfTI) and CHAOS MR (DICOM + PNG masks, or NIfTI conversions).

  CT: <root>/<ct_dir>/img/imgNNNN.nii.gz + label/labelNNNN.nii.gz, or the distributed
  <root>/<ct_dir>/RawData/Training/{img,label}/.
  MR: <root>/<mr_dir>/Train_Sets/MR/<patient>/T2SPIR/{DICOM_anon/*.dcm, Ground/*.png} and
  .../T1DUAL/DICOM_anon/{InPhase,OutPhase}/*.dcm with .../T1DUAL/Ground/*.png, or
  <root>/<mr_dir>/{images,labels}/<name>.nii.gz with the CHAOS grey values as codes.

  Each CHAOS sequence is a modality of its own, with its own normalisation, because their
  contrasts differ as much as CT's and MR's: `mr_sequences` maps modality names to sequences
  (`CHAOS_SEQUENCES`), e.g. {'t1in': 'T1DUAL/InPhase', 't1out': 'T1DUAL/OutPhase',
  't2': 'T2SPIR'}; the default {'mr': 'T2SPIR'} is the one MR modality.  A patient lacking a
  sequence asked for is an error.  The NIfTI conversions hold one sequence, so they serve one
  MR modality only.  `modalities` (default: 'ct' and every `mr_sequences` name) picks which
  the adapter lists.

  `organs='shared'` trains the 4 organs both label (liver, kidneys, spleen), BTCV's other 9
  becoming background; `organs='all_ct'` trains BTCV's 13 in BTCV's code order, of which
  CHAOS MR labels 4 (`labelled`), so MR learns the other 9 from CT alone.
  """

  def __init__(
    self,
    *,
    ct_dir: str = "BTCV",
    mr_dir: str = "CHAOS",
    mr_sequences=None,
    modalities=None,
    organs: str = "shared",
    ignore_unknown_labels: bool = False,
  ):
    super().__init__(ignore_unknown_labels=ignore_unknown_labels)
    if organs not in ORGANS:
      raise error(DataError, f"abdominal option organs={organs!r}", f"choose from {tuple(ORGANS)}")
    self.ct_dir, self.mr_dir, self.organs = ct_dir, mr_dir, organs
    self.classes = ORGANS[organs]
    self.lateral_pairs = lateral.pairs_by_name(self.classes)  # kidneys; adrenal glands too
    self.mr_sequences = _check_sequences({"mr": "T2SPIR"} if mr_sequences is None else mr_sequences)
    allowed = ("ct", *self.mr_sequences)
    self.modalities = check_modalities(
      allowed if modalities is None else modalities, allowed, "abdominal"
    )

  @property
  def phantom_options(self) -> dict:
    """The CHAOS phantoms hold T1-DUAL only when asked (`ukd.data.synthetic.generate`)."""
    t1dual = any(s.startswith("T1DUAL") for s in self.mr_sequences.values())
    return {"t1dual": True} if t1dual else {}

  def cases(self, root: str) -> list[Case]:
    root = require_root(root)
    return [
      case
      for m in self.modalities
      for case in (self._btcv_cases(root) if m == "ct" else self._chaos_cases(root, m))
    ]

  def _btcv_cases(self, root: str) -> list[Case]:
    base = os.path.join(root, self.ct_dir)
    for sub in ("", os.path.join("RawData", "Training")):
      if epath.Path(base, sub, "img").is_dir():
        folder = os.path.join(base, sub)
        break
    else:
      raise error(DataError, base, "no BTCV img/ or RawData/Training/img/ folder found")
    images = match_files(os.path.join(folder, "img"), r"img(\d+)")
    label_dir = require_dir(os.path.join(folder, "label"), "BTCV label folder")
    labels = match_files(label_dir, r"label(\d+)")
    return pair_cases(images, labels, "ct", folder, lambda key: f"btcv_{key}")

  def _chaos_cases(self, root: str, modality: str) -> list[Case]:
    base = os.path.join(root, self.mr_dir)
    dicom_root = os.path.join(base, "Train_Sets", "MR")
    if epath.Path(dicom_root).is_dir():
      return _chaos_dicom_cases(dicom_root, modality, self.mr_sequences[modality])
    if epath.Path(base, "images").is_dir():
      if len(self.mr_sequences) > 1:
        raise error(
          DataError,
          base,
          f"NIfTI conversions hold one MR sequence, not the {len(self.mr_sequences)} of "
          f"mr_sequences={self.mr_sequences}; use the Train_Sets/MR DICOM layout",
        )
      images = match_files(os.path.join(base, "images"), r"(.+)")
      label_dir = require_dir(os.path.join(base, "labels"), "CHAOS labels folder")
      labels = match_files(label_dir, r"(.+)")
      return pair_cases(images, labels, modality, base, lambda key: f"chaos_{key}")
    raise error(DataError, base, "no CHAOS Train_Sets/MR/ or images/ folder found")

  def labelled(self, modality: str) -> tuple[str, ...]:
    return self.classes if modality == "ct" else ABDOMINAL_CLASSES

  def _class_of(self, shared_index: int) -> int:
    """The class index of a class of ABDOMINAL_CLASSES, for this `organs` choice."""
    return self.classes.index(ABDOMINAL_CLASSES[shared_index])

  def code_table(self, modality: str) -> dict[int, int]:
    if modality == "ct":
      return BTCV_CODES if self.organs == "shared" else {k: k for k in range(len(self.classes))}
    return {code: self._class_of(index) for code, index in CHAOS_TABLE.items()}

  def held_codes(self, modality: str) -> dict[int, int]:
    if modality == "ct":
      return super().held_codes(modality)
    return {self._class_of(index): code for index, code in enumerate(CHAOS_CODES)}

  def read(self, case: Case) -> tuple[Volume, Volume | None]:
    if case.modality == "ct" or not epath.Path(case.image).is_dir():
      return self._read_nifti(case)
    image, label = read_dicom_series(case.image, case.label)
    if label is not None:
      label = map_labels(label, self.code_table(case.modality).get, self.ignore_unknown_labels)
    return image, label


def _check_sequences(mr_sequences) -> dict[str, str]:
  """`mr_sequences` as {modality: CHAOS sequence}: at least one, known sequences, each read
  once, and no modality named 'ct' (BTCV's)."""
  sequences = {str(m): str(s) for m, s in dict(mr_sequences).items()}
  values = list(sequences.values())
  if (
    not sequences
    or "ct" in sequences
    or not set(values) <= set(CHAOS_SEQUENCES)
    or len(set(values)) != len(values)
  ):
    raise error(
      DataError,
      f"abdominal option mr_sequences={sequences}",
      f"map MR modality names (not 'ct') to distinct sequences of {tuple(CHAOS_SEQUENCES)}",
    )
  return sequences


def _chaos_dicom_cases(dicom_root: str, modality: str, sequence: str) -> list[Case]:
  """One case per patient folder; a patient without the sequence's DICOMs or masks is an
  error.  Masks pair with slices by sorted file name (`read_dicom_series`), which serves both
  T1-DUAL phases: each has as many slices as the shared masks, in the same order."""
  dicom_part, ground_part = CHAOS_SEQUENCES[sequence]
  cases = []
  for patient in visible(dicom_root):
    dicom_dir = os.path.join(dicom_root, patient, *dicom_part.split("/"))
    if not files.glob(dicom_dir, "*.dcm"):
      raise error(DataError, dicom_dir, f"no {sequence} DICOM slices (*.dcm) found")
    ground = os.path.join(dicom_root, patient, *ground_part.split("/"))
    if not files.glob(ground, "*.png"):
      raise error(DataError, ground, "image has no label: no PNG masks found")
    cases.append(Case(f"chaos_{patient}", modality, dicom_dir, ground))
  if not cases:
    raise error(DataError, dicom_root, f"no {modality} cases found")
  return cases
