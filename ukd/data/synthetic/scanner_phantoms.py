"""Cardiac CT and MR phantoms acquired as the MM-WHS scanners acquire them ('scanner' set).

The 'simple' phantoms (`ukd.data.synthetic.phantoms`) differ between the modalities in contrast only:
both see the same heart at similar voxel sizes, blood pools told apart by brightness. Real
MM-WHS CT and MR differ far more (Zhuang & Shen 2016, MedIA 31; Zhuang et al. 2019, MedIA 58,
"Evaluation of algorithms for multi-modality whole heart segmentation"):

  CT  coronary CT angiography on 64-slice scanners: in-plane about 0.3-0.6 mm, slices about
      0.6 mm, a field of view tight around the heart, contrast-filled blood pools.
  MR  navigator-gated 3D balanced SSFP (b-SSFP) at 1.5 T, acquired at about 2 mm and
      reconstructed at about 1 mm, slices coarser than in-plane, a larger field of view that
      holds the chest wall, lungs, spine and liver dome.

This module samples the anatomy of `ukd.data.synthetic.phantoms` (the same heart, plus the liver dome and
descending aorta that the wider MR field of view sees, unlabelled) that way. The voxel grid
keeps the configured shape, so training costs what it costs on the simple set; a grid of
64 x 64 x 40 voxels holds about 5 (MR) to 8 (CT) times fewer voxels per axis than the
protocols' volumes. What is kept is each modality's field of view (the anatomy it covers)
and the ratio of slice spacing to in-plane spacing; the voxels grow to fill the field of view.
At the study's shape (64, 64, 40):

  CT  180 x 180 x 150 mm: 2.8 x 2.8 x 3.75 mm, slice / in-plane 1.33 (0.6 / 0.45 mm).
  MR  280 x 280 x 250 mm: 4.4 x 4.4 x 6.25 mm, slice / in-plane 1.43 (1.3 / 0.9 mm), first
      acquired 2x coarser along the two phase-encoding axes, then interpolated back.

Label codes, dtypes, array axes and affines are those of the simple MM-WHS phantoms, so the
dataset adapters read both sets alike. CT and MR cases draw their anatomy from their own
random streams (unpaired); the same seed gives identical arrays.

Every number below is a named constant with its source (a published protocol or reference
value) or, where none applies, the word "chosen" and the reason. These parameters were fixed
and committed before the first study run on this set and are not to be tuned after seeing
results: a change makes a new set, to be written down and committed before it is used.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage

from ukd.data.synthetic import phantoms
from ukd.data.synthetic.phantoms import RAS_FROM_LPS, Phantom, check_shape
from ukd.errors import DataError

# ----------------------------------------------------------------------------- acquisition

# Fields of view (mm along the array axes), array axes and centres (LPS mm, in the frame of
# `phantoms._cardiac_shapes`: LV centre at the origin, body midline at x = -35 mm).
# CT: in-plane 180 mm = a 512 matrix at 0.35 mm, inside MM-WHS's 0.3-0.6 mm; along z 150 mm
#   = 250 slices of 0.6 mm, from the diaphragm to the aortic arch (Zhuang et al. 2019: the CT
#   covers the whole heart from the upper abdomen to the aortic arch). Axial, not tilted.
# MR: in-plane 280 mm holds the whole chest (the phantom's: about 270 x 190 mm): along the
#   phase-encoding axis anything outside the field of view wraps around into the image (Zhuo &
#   Gullapalli 2006, RadioGraphics 26, "MR artifacts, safety, and quality control"), so a chest
#   scan covers the body. Along z 250 mm makes slice / in-plane 1.43, the protocol's
#   reconstructed 1.3 / 0.9 mm (Zhuang et al. 2019: acquired (1.6-2) x (1.6-2) x (2-3.2) mm,
#   reconstructed at half that), reaching from the liver to above the aortic arch. Oblique by up
#   to 6 degrees as in the simple set.
GRIDS = {
  "ct": phantoms._GridSpec((180.0, 180.0, 150.0), "RAS", (-12.0, 10.0, 25.0), 0.0),
  "mr": phantoms._GridSpec((280.0, 280.0, 250.0), "ARI", (-25.0, 25.0, 5.0), 6.0),
}

# A voxel averages the tissue over its extent; a Gaussian with the standard deviation of a
# one-voxel box (1 / sqrt(12) voxel) stands in for that average (chosen: the scanners'
# point spread, under 1 mm, is small against these voxels).
VOXEL_SIGMA = 1.0 / math.sqrt(12.0)

# MR acquisition factor per array axis (A = in-plane phase encoding, R = readout, I = slab phase
# encoding): the protocol reconstructs at half its acquisition resolution along every axis
# (Zhuang et al. 2019). On this grid a 2x coarser readout as well would leave the myocardium
# (about 12 mm) little more than one acquisition voxel thick in every direction, against about
# six in the real scans; the readout, which costs no scan time (Bernstein et al. 2004, "Handbook
# of MRI Pulse Sequences"), is kept at the reconstruction spacing (chosen).
MR_ACQUISITION = (2, 1, 2)

# ----------------------------------------------------------------------------- CT

# Per-case HU, drawn uniformly in (low, high). Unenhanced tissues: Prokop & Galanski 2003,
# "Spiral and Multislice Computed Tomography of the Body" (attenuation values); air is -1000
# by the definition of the Hounsfield scale.
CT_HU = {
  "air": (-1000.0, -1000.0),
  "fat": (-120.0, -80.0),
  "muscle": (40.0, 60.0),
  "lung": (-900.0, -800.0),
  # A vertebra at these voxel sizes mixes cancellous (200-400 HU) and cortical (> 1000 HU)
  # bone (Prokop & Galanski 2003); chosen in between.
  "bone": (600.0, 800.0),
  # Arterial phase: the liver has not enhanced much yet, the myocardium has (about 100 HU
  # in coronary CT angiography; Prokop & Galanski 2003).
  "liver": (60.0, 100.0),
  "myocardium": (90.0, 130.0),
}
# Left heart and aorta: coronary CT angiography aims at 300-400 HU or more in the aortic root
# (Abbara et al. 2016, SCCT guidelines for the performance and acquisition of coronary CT
# angiography: at least 250 HU, bolus tracking in the ascending aorta).
CT_LEFT_BLOOD_HU = (300.0, 400.0)
# Right heart and pulmonary artery as a fraction of the left: a left-heart-timed scan with a
# saline chaser washes contrast out of the right heart, by how much depends on the timing
# (Abbara et al. 2016); chosen 0.5-1.
CT_RIGHT_TO_LEFT = (0.5, 1.0)
# Quantum noise (HU, standard deviation per voxel): coronary CT angiography is read at about
# 25-35 HU of noise in the aortic root (Abbara et al. 2016 target image quality; chosen 30).
# Averaging the protocol's voxels into these larger ones would lower it; the protocol's
# per-voxel noise is kept so that the contrast-to-noise ratio per voxel, what a network sees,
# is the real one.
CT_NOISE_HU = 30.0

# Blood pools by side of the heart; the descending aorta is unlabelled (MM-WHS labels the
# ascending aorta) but as bright as the left heart.
_BLOOD = {
  "right_atrium": "right",
  "right_ventricle": "right",
  "pulmonary_artery": "right",
  "left_atrium": "left",
  "left_ventricle": "left",
  "aorta": "left",
  "descending_aorta": "left",
}

# ----------------------------------------------------------------------------- MR

# b-SSFP contrast follows T2/T1 (Scheffler & Lehnhardt 2003, Eur Radiol 13, "Principles and
# applications of balanced SSFP techniques"): on resonance, with TR << T2,
#   S = M0 sin(a) / (1 + cos(a) + (1 - cos(a)) T1 / T2),
# so blood and fat are bright and myocardium and muscle dark. Flip angle: chosen 70 degrees,
# within the 50-90 degrees of cardiac b-SSFP at 1.5 T.
MR_FLIP_DEG = 70.0
# (T1 ms, T2 ms, proton density relative to soft tissue) at 1.5 T. Blood, myocardium
# ('heart'), skeletal muscle, liver: Stanisz et al. 2005, MRM 54, "T1, T2 relaxation and
# magnetization transfer in tissue at 3T" (its 1.5 T table). Subcutaneous fat: de Bazelaire
# et al. 2004, Radiology 230 (1.5 T). Proton density is taken as equal for soft tissues
# (chosen: its 10-20 % spread is small against b-SSFP's T2/T1 contrast); lung holds 15 % of
# the protons of water, as its CT value (-850 HU) gives, with the relaxation of blood (chosen:
# lung tissue is mostly capillary blood). Air has no protons.
MR_RELAXATION = {
  "blood": (1441.0, 290.0, 1.0),
  "myocardium": (1030.0, 40.0, 1.0),
  "muscle": (1008.0, 44.0, 1.0),
  "liver": (576.0, 46.0, 1.0),
  "fat": (343.0, 58.0, 1.0),
  "lung": (1441.0, 290.0, 0.15),
}
# Vertebral marrow signal as this fat fraction of fat plus the rest of muscle (chosen: adult
# vertebral marrow is about 30-50 % fat).
MR_MARROW_FAT = 0.4
# Per-case, per-tissue contrast spread, +- this fraction (chosen: about the between-subject
# spread of the relaxation times in Stanisz et al. 2005).
MR_TISSUE_SPREAD = 0.05
# Signal units: blood at the centre of the field of view before the gain (chosen: 12-bit
# storage with room for coil shading and gain); receiver gain per case (chosen, as in the
# simple set).
MR_BLOOD_LEVEL = 1000.0
MR_GAIN = (0.8, 1.5)
# Signal-to-noise ratio of blood at the centre of the field of view, per reconstructed voxel
# (chosen, of the order of the blood SNR of navigator-gated whole-heart b-SSFP at 1.5 T,
# e.g. Weber et al. 2003, MRM 50, "Whole-heart steady-state free precession coronary artery
# magnetic resonance angiography"). The noise is white on the reconstruction grid (chosen:
# simpler than the correlation that zero-filled interpolation gives it).
MR_SNR = 20.0
# Receive coil shading (the B1 bias field): one anterior and one posterior surface coil, each
# a loop whose sensitivity falls with distance d as a loop's on-axis field,
# (r^2 / (r^2 + d^2))^(3/2) (Biot-Savart), combined as root sum of squares like a phased
# array (Roemer et al. 1990, MRM 16, "The NMR phased array"). Surface coils shade images by
# factors of several (Axel et al. 1987, AJR 148, "Intensity correction in surface-coil MR
# imaging"). Loop radius: chosen 150 mm, about half the width of a cardiac array, so each
# half covers its side of the chest; inside the body the field then spans about 2.5x between
# its 5th and 95th percentiles (the simple set's: about 1.4x). Coil centres (LPS mm) on the
# chest wall over the heart and on the back, moved per case by this standard deviation
# (chosen: placement by hand).
MR_COIL_RADIUS_MM = 150.0
MR_COILS_LPS = ((-20.0, -65.0, 10.0), (-20.0, 125.0, 10.0))
MR_COIL_PLACEMENT_MM = 10.0
# Respiratory ghosting: residual breathing motion modulates k-space along the phase-encoding
# axis and repeats the image along it (Zhuo & Gullapalli 2006). One ghost, this fraction of
# the image, shifted by half the field of view along the in-plane phase-encoding axis (A),
# wrapping around (chosen: navigator gating leaves faint ghosts; half a field of view puts the
# chest's ghost over the air in front of and behind it, where it shows as on real scans).
MR_GHOST = 0.08
MR_GHOST_SHIFT = 0.5

_MR_MAX = 4095  # 12 bits stored, as the simple set's MR

# A second MR contrast, 'mr_t2': T2-weighted black-blood turbo spin echo, the cardiac T2
# sequence (Simonetti et al. 1996, Radiology 199, "'Black blood' T2-weighted inversion-recovery
# MR imaging of the heart"). A spin echo's signal is S = M0 (1 - exp(-TR / T1)) exp(-TE / T2);
# TR spans two heartbeats (chosen 1800 ms: 2 x 900 ms), TE chosen 70 ms, within the 60-100 ms
# of such protocols. Its double inversion nulls the blood that flows into the slice: flowing
# blood keeps this fraction of its signal (chosen); lung tissue (capillary blood) is not nulled.
# Myocardium is then grey, fat and liver brighter, the blood pools dark: the blood contrast of
# b-SSFP inverted. Grid, acquisition, coils, ghost and noise are b-SSFP's; its cases are
# patients of their own (random streams apart from the b-SSFP cases').
MR_T2_TR_MS = 1800.0
MR_T2_TE_MS = 70.0
MR_T2_BLOOD_RESIDUAL = 0.05
# The contrasts the scanner set renders: `make_phantom`'s `modality`.
CONTRASTS = ("ct", "mr", "mr_t2")

# ----------------------------------------------------------------------------- anatomy

# Tissues of the scanner set: the simple heart and thorax, plus what the MR field of view
# adds. Codes of the heart's structures are the simple set's (MM-WHS codes); others are 0.
TISSUES = (*phantoms._CARDIAC, "liver", "descending_aorta")
_CODES = np.array(
  [phantoms._CARDIAC[name].code if name in phantoms._CARDIAC else 0 for name in TISSUES],
  np.uint16,
)


def _more_body(jitter) -> list:
  """The liver dome under the right hemidiaphragm (it replaces the base of the right lung) and
  the descending aorta left of the spine; same frame as `phantoms._cardiac_shapes`."""
  return [
    ("liver", jitter.ellipsoid((-75, 20, -130), (70, 65, 85))),
    ("descending_aorta", jitter.tube([(-15, 68, 110), (-12, 74, 0), (-18, 76, -150)], 11)),
  ]


# ----------------------------------------------------------------------------- rendering


def _bssfp(t1: float, t2: float, density: float) -> float:
  """Steady-state b-SSFP signal of one tissue (`MR_FLIP_DEG`), in units of M0."""
  a = math.radians(MR_FLIP_DEG)
  return density * math.sin(a) / (1.0 + math.cos(a) + (1.0 - math.cos(a)) * t1 / t2)


def _t2_spin_echo(t1: float, t2: float, density: float) -> float:
  """T2-weighted spin echo signal of one tissue (`MR_T2_TR_MS`, `MR_T2_TE_MS`), in units of M0."""
  return density * (1.0 - math.exp(-MR_T2_TR_MS / t1)) * math.exp(-MR_T2_TE_MS / t2)


def _mr_contrast(contrast: str) -> dict[str, float]:
  """Signal of each MR tissue class relative to the brightest one (blood in b-SSFP, fat in
  the T2-weighted black-blood image)."""
  if contrast == "mr":
    signal = {name: _bssfp(*values) for name, values in MR_RELAXATION.items()}
  else:
    signal = {name: _t2_spin_echo(*values) for name, values in MR_RELAXATION.items()}
    signal["blood"] *= MR_T2_BLOOD_RESIDUAL
  signal["air"] = 0.0
  signal["marrow"] = MR_MARROW_FAT * signal["fat"] + (1.0 - MR_MARROW_FAT) * signal["muscle"]
  brightest = max(signal.values())
  return {name: value / brightest for name, value in signal.items()}


def _ct_values(rng: np.random.Generator) -> np.ndarray:
  """Per-case HU of every tissue: the contrast timing sets both sides of the heart."""
  left = rng.uniform(*CT_LEFT_BLOOD_HU)
  blood = {"left": left, "right": left * rng.uniform(*CT_RIGHT_TO_LEFT)}
  tissue = {name: rng.uniform(low, high) for name, (low, high) in CT_HU.items()}
  return np.array([blood[_BLOOD[n]] if n in _BLOOD else tissue[n] for n in TISSUES], np.float32)


def _mr_values(rng: np.random.Generator, contrast: str) -> np.ndarray:
  """Per-case signal of every tissue (the brightest = `MR_BLOOD_LEVEL`)."""
  contrast = _mr_contrast(contrast)
  spread = rng.uniform(-MR_TISSUE_SPREAD, MR_TISSUE_SPREAD, len(contrast))
  case = {name: value * (1.0 + s) for (name, value), s in zip(contrast.items(), spread)}
  classes = ["blood" if n in _BLOOD else "marrow" if n == "bone" else n for n in TISSUES]
  return np.array([case[c] * MR_BLOOD_LEVEL for c in classes], np.float32)


def acquire(image: np.ndarray, factors) -> np.ndarray:
  """`image` as an acquisition `factors` times coarser per axis sees it, back on its grid.

  Each acquisition voxel averages the `factors` voxels it covers (partial volume); linear
  interpolation back to the reconstruction grid stands in for the scanner's zero-filled
  Fourier interpolation. An axis with factor 1 comes back unchanged.
  """
  padded = np.pad(image, [(0, -n % f) for n, f in zip(image.shape, factors)], mode="edge")
  blocks = [d for n, f in zip(padded.shape, factors) for d in (n // f, f)]
  coarse = padded.reshape(blocks).mean(axis=(1, 3, 5))
  fine = scipy.ndimage.zoom(coarse, factors, order=1, mode="nearest", grid_mode=True)
  return fine[tuple(slice(0, n) for n in image.shape)]


def _coil_field(centres: np.ndarray, shape, lps: np.ndarray, rng) -> np.ndarray:
  """Receive coil sensitivity at the voxel centres (LPS mm), 1 at the field of view's centre."""
  placed = [np.asarray(c) + rng.normal(0.0, MR_COIL_PLACEMENT_MM, 3) for c in MR_COILS_LPS]
  middle = lps[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + lps[:3, 3]

  def sensitivity(points):
    r2 = np.float32(MR_COIL_RADIUS_MM**2)
    loops = [r2 / (r2 + ((points - phantoms._column(c)) ** 2).sum(axis=0)) for c in placed]
    return np.sqrt(sum(loop**3 for loop in loops))

  return (sensitivity(centres) / sensitivity(phantoms._column(middle))).reshape(shape)


def _ghost(image: np.ndarray) -> np.ndarray:
  """Adds the respiratory ghost along array axis 0, the in-plane phase-encoding axis."""
  shift = int(round(MR_GHOST_SHIFT * image.shape[0]))
  return image + np.float32(MR_GHOST) * np.roll(image, shift, axis=0)


def _render_ct(tissue: np.ndarray, rng) -> np.ndarray:
  """Voxel-averaged HU plus quantum noise, stored as CT stores it (int16, -1024..3071)."""
  image = scipy.ndimage.gaussian_filter(_ct_values(rng)[tissue], VOXEL_SIGMA)
  image += np.float32(CT_NOISE_HU) * phantoms._noise(rng, tissue.shape)
  return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _render_mr(tissue: np.ndarray, coils: np.ndarray, rng, contrast: str) -> np.ndarray:
  """Coil-shaded MR signal, acquired coarser, ghosted, with Rician noise and a gain."""
  values = _mr_values(rng, contrast)
  image = scipy.ndimage.gaussian_filter(values[tissue], VOXEL_SIGMA) * coils
  image = _ghost(acquire(image, MR_ACQUISITION))
  sigma = np.float32(MR_BLOOD_LEVEL / MR_SNR)
  real = image + sigma * phantoms._noise(rng, tissue.shape)
  imaginary = sigma * phantoms._noise(rng, tissue.shape)
  image = np.sqrt(real * real + imaginary * imaginary) * np.float32(rng.uniform(*MR_GAIN))
  return np.clip(np.rint(image), 0, _MR_MAX).astype(np.uint16)


def make_phantom(
  anatomy: str, modality: str, shape=phantoms.DEFAULT_SHAPE, *, seed: int = 0, index: int = 0
) -> Phantom:
  """One scanner-set case in memory, as `phantoms.make_phantom` makes a simple one.

  Its random stream differs from the simple set's case of the same seed and index.
  `modality` is one of `CONTRASTS`: 'ct', 'mr' (b-SSFP) or 'mr_t2' (the second MR contrast).
  """
  if anatomy != "cardiac" or modality not in CONTRASTS:
    raise DataError(
      f"scanner phantom {anatomy!r}/{modality!r} unknown: the scanner set is cardiac (MM-WHS) "
      f"only, modality in {CONTRASTS}"
    )
  shape = check_shape(shape)
  # The simple set's stream key plus a fifth entry: the scanner set's streams are its own
  # (1 for CT and b-SSFP, 2 for the T2-weighted cases).
  scanner = modality if modality in phantoms.MODALITIES else "mr"
  stream = [seed, phantoms.ANATOMIES.index(anatomy), phantoms.MODALITIES.index(scanner), index]
  rng = np.random.default_rng([*stream, 1 if modality == scanner else 2])
  lps = phantoms._lps_affine(GRIDS[scanner], shape, rng)
  spacing = np.linalg.norm(lps[:3, :3], axis=0)
  centres = phantoms._voxel_centres(shape, lps)
  points = centres + phantoms._displacement(shape, spacing, rng)
  tissue = phantoms._cardiac_tissue(points, rng, TISSUES, _more_body).reshape(shape)
  if modality == "ct":
    image = _render_ct(tissue, rng)
  else:
    image = _render_mr(tissue, _coil_field(centres, shape, lps, rng), rng, modality)
  return Phantom(image, _CODES[tissue], RAS_FROM_LPS @ lps)
