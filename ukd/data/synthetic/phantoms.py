"""Phantom CT and MR volumes: simple anatomy (heart, abdomen) sampled as each modality sees it.

`ukd.data.synthetic.generate` writes them in the on-disk layouts of MM-WHS 2017, BTCV and CHAOS.

The real datasets need a registration and cannot be fetched everywhere, yet the dataset
adapters, preprocessing, training and evaluation must run end to end on files that look
like the real ones: the same folders, file names, label codes, dtypes and geometry
conventions. The anatomy is deliberately simple (ellipsoids and tubes, smoothly deformed)
but sized and contrasted so that a small 2D network learns it within minutes on a CPU.

Every case draws its own anatomy (pose, size, deformation) from its own random stream, so
CT and MR cases are unpaired, exactly as in the real data. The same seed gives identical
arrays; case ``index`` does not depend on how many cases are written.

Geometry
  Anatomy is modelled in patient coordinates, millimetres, DICOM convention (LPS): +x
  towards the patient's left, +y posterior, +z superior (head). Each modality samples it on
  its own voxel grid. NIfTI files carry the RAS affine ``diag(-1, -1, 1, 1) @ lps_affine``
  (qform and sform, code 1). Array axes on disk; the third is always the slice axis, along
  the patient's feet-head axis:

    MM-WHS CT   (R, A, S)   affine diag(+dx, +dy, +dz) plus origin
    MM-WHS MR   (A, R, I)   tilted obliquely by up to 6 degrees
    BTCV CT     (L, P, S)   affine diag(-dx, -dy, +dz) plus origin
    CHAOS MR    DICOM rows -> P, columns -> L, InstanceNumber 1, 2, ... -> I (instance 1 is
                the most superior slice); ImageOrientationPatient [1, 0, 0, 0, 1, 0];
                ImagePositionPatient is the centre of pixel (0, 0); PixelSpacing is
                [between rows, between columns]. The PNG mask of a slice has the same
                (row, column) grid as the slice's pixel_array.

Intensities: CT in HU (int16, Gaussian noise); MR in arbitrary units (uint16 below 4096,
smooth multiplicative bias field, Rician noise, random overall gain). Contrasts differ
between the modalities, e.g. cardiac CT orders aorta > LV > LA > myocardium while MR
orders LV > LA > aorta > myocardium, and fat is dark in CT but bright in cardiac MR.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import scipy.ndimage

from ukd.errors import DataError

DEFAULT_SHAPE = (48, 48, 24)
ANATOMIES = ("cardiac", "abdominal")
MODALITIES = ("ct", "mr")

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DIRECTIONS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_AXIS_LETTERS = dict(zip("LRPASI", _DIRECTIONS))  # each direction letter as an LPS unit vector
_MR_MAX = 4095  # MR DICOM commonly stores 12 bits; the CHAOS writer declares BitsStored 12.
_FAR = 1e4  # radius (mm) that makes an ellipsoid a cylinder within any field of view


class _Tissue(NamedTuple):
  """One tissue: its label code on disk (0 = unlabelled) and its mean CT / MR intensity."""

  code: int
  ct: float  # HU
  mr: float  # arbitrary units before bias field, noise and gain


# Blood pools get different values (real CT angiography differs less) so the demo network can
# tell LV, LA and aorta apart after a few minutes of training; position still matters.
_CARDIAC = {
  "air": _Tissue(0, -1000.0, 0.0),
  "fat": _Tissue(0, -100.0, 780.0),
  "muscle": _Tissue(0, 40.0, 260.0),
  "lung": _Tissue(0, -850.0, 40.0),
  "bone": _Tissue(0, 650.0, 320.0),
  "right_atrium": _Tissue(550, 170.0, 820.0),
  "right_ventricle": _Tissue(600, 210.0, 760.0),
  "pulmonary_artery": _Tissue(850, 240.0, 300.0),
  "left_atrium": _Tissue(420, 290.0, 620.0),
  "aorta": _Tissue(820, 440.0, 460.0),
  "myocardium": _Tissue(205, 110.0, 170.0),
  "left_ventricle": _Tissue(500, 360.0, 900.0),
}

# MR values follow T2 with fat suppression (CHAOS T2-SPIR): fat dark, fluid bright,
# flowing blood dark. CT follows the portal venous phase with the liver-spleen-kidney steps
# widened (real CT soft-tissue contrast is lower) so the demo learns CT as fast as MR.
_ABDOMINAL = {
  "air": _Tissue(0, -1000.0, 0.0),
  "fat": _Tissue(0, -100.0, 90.0),
  "muscle": _Tissue(0, 50.0, 180.0),
  "lung": _Tissue(0, -850.0, 20.0),
  "bone": _Tissue(0, 500.0, 130.0),
  "liver": _Tissue(6, 100.0, 300.0),
  "stomach": _Tissue(7, 20.0, 950.0),
  "spleen": _Tissue(1, 160.0, 560.0),
  "gallbladder": _Tissue(4, 10.0, 1100.0),
  "right_kidney": _Tissue(2, 220.0, 700.0),
  "left_kidney": _Tissue(3, 220.0, 700.0),
  "inferior_vena_cava": _Tissue(9, 145.0, 110.0),
  "aorta": _Tissue(8, 180.0, 60.0),
}


class _GridSpec(NamedTuple):
  """How a dataset's scanner frames the anatomy: field of view, array axes, obliquity."""

  fov: tuple[float, float, float]  # mm along the array axes
  axes: str  # patient direction of each array axis (LPS letters)
  centre: tuple[float, float, float]  # LPS mm, in the anatomy's frame
  max_tilt: float  # degrees of random oblique rotation


# Cardiac fields of view are cropped around the heart (as most MM-WHS volumes are), MR a
# little wider than CT; tight enough that the myocardium stays a few voxels thick when the
# demo resizes slices to 64x64.
_GRIDS = {
  ("cardiac", "ct"): _GridSpec((170.0, 170.0, 150.0), "RAS", (-12.0, 10.0, 25.0), 0.0),
  ("cardiac", "mr"): _GridSpec((185.0, 185.0, 170.0), "ARI", (-15.0, 15.0, 25.0), 6.0),
  ("abdominal", "ct"): _GridSpec((340.0, 340.0, 220.0), "LPS", (0.0, 10.0, 30.0), 0.0),
  ("abdominal", "mr"): _GridSpec((380.0, 380.0, 240.0), "PLI", (0.0, 10.0, 30.0), 0.0),
}


@dataclasses.dataclass(frozen=True)
class Phantom:
  """One synthetic case as it goes to disk."""

  image: np.ndarray  # int16 HU (CT) or uint16 (MR), array axes as on disk
  label: np.ndarray  # dataset codes: MM-WHS (cardiac) or BTCV (abdominal, both modalities)
  affine: np.ndarray  # 4x4 voxel -> RAS mm (NIfTI convention)

  @property
  def spacing(self) -> tuple[float, float, float]:
    """Voxel size (mm) along the array axes."""
    return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


# ----------------------------------------------------------------------------- shapes


# Points are [3, N] float32 (one row per coordinate): the layout that makes the 3x3 products
# and the per-voxel arithmetic below fast enough for seconds-per-dataset generation.


def _column(vector) -> np.ndarray:
  return np.asarray(vector, np.float32).reshape(3, 1)


@dataclasses.dataclass(frozen=True)
class _Ellipsoid:
  """Solid ellipsoid; a huge radius turns it into an elliptic cylinder (body, spine)."""

  centre: np.ndarray
  radii: np.ndarray
  axes: np.ndarray  # columns: unit principal axes

  def bounds(self) -> tuple[np.ndarray, np.ndarray]:
    half = np.sqrt(((self.axes * self.radii) ** 2).sum(axis=1))
    return _column(self.centre - half), _column(self.centre + half)

  def inside(self, points: np.ndarray) -> np.ndarray:
    q = (self.axes.T.astype(np.float32) @ (points - _column(self.centre))) / _column(self.radii)
    return np.einsum("ij,ij->j", q, q) <= 1.0


@dataclasses.dataclass(frozen=True)
class _Tube:
  """Points within `radius` of a polyline: vessels that bend."""

  path: np.ndarray  # [K, 3]
  radius: float

  def bounds(self) -> tuple[np.ndarray, np.ndarray]:
    low, high = self.path.min(axis=0), self.path.max(axis=0)
    return _column(low - self.radius), _column(high + self.radius)

  def inside(self, points: np.ndarray) -> np.ndarray:
    result = np.zeros(points.shape[1], bool)
    for start, end in zip(self.path[:-1], self.path[1:]):
      step = (end - start).astype(np.float32)
      relative = points - _column(start)
      along = np.clip(step @ relative / (step @ step), 0.0, 1.0)
      offset = relative - _column(step) * along
      result |= np.einsum("ij,ij->j", offset, offset) <= self.radius**2
    return result


def _rotation(angles_deg) -> np.ndarray:
  """Rotation about x, then y, then z (degrees)."""
  ax, ay, az = np.radians(angles_deg)
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


def _frame(long_axis) -> np.ndarray:
  """Orthonormal axes whose first column is `long_axis` (for organs with a long axis)."""
  u = np.asarray(long_axis, float) / np.linalg.norm(long_axis)
  v = np.cross(u, (0.0, 0.0, 1.0))
  v /= np.linalg.norm(v)
  return np.stack([u, v, np.cross(u, v)], axis=1)


class _Jitter:
  """Per-case variation of every organ, so no two cases share an exact shape."""

  def __init__(self, rng: np.random.Generator):
    self.rng = rng

  def ellipsoid(self, centre, radii, axes=None, shift=4.0, scale=0.08) -> _Ellipsoid:
    centre = np.asarray(centre, float) + self.rng.normal(0.0, shift, 3)
    radii = np.asarray(radii, float) * (1.0 + self.rng.uniform(-scale, scale, 3))
    return _Ellipsoid(centre, radii, np.eye(3) if axes is None else np.asarray(axes, float))

  def tube(self, path, radius, shift=3.0, scale=0.08) -> _Tube:
    path = np.asarray(path, float) + self.rng.normal(0.0, shift, (len(path), 3))
    return _Tube(path, radius * (1.0 + self.rng.uniform(-scale, scale)))


def _inset(outline: _Ellipsoid, thickness: float) -> _Ellipsoid:
  """The body outline shrunk in-plane by the subcutaneous fat thickness."""
  return _Ellipsoid(outline.centre, outline.radii - (thickness, thickness, 0.0), outline.axes)


# ----------------------------------------------------------------------------- anatomy


def _cardiac_shapes(rng: np.random.Generator):
  """Thorax and heart in paint order (later shapes overwrite earlier ones).

  Coordinates are LPS mm around the LV centre, 35 mm left of the midline. The LV long
  axis runs from the base (right, posterior, superior) to the apex (left, anterior,
  inferior). Painting MYO and then the LV cavity makes the myocardium a shell; the RV,
  painted before them, becomes a crescent.
  Returns (body shapes, heart shapes): the heart gets its own pose.
  """
  j = _Jitter(rng)
  fat = rng.uniform(8.0, 16.0)
  outline = j.ellipsoid((-35, 30, 0), (135, 95, _FAR), shift=2)
  body = [
    ("fat", outline),
    ("muscle", _inset(outline, fat)),
    ("lung", j.ellipsoid((-100, 35, 20), (50, 62, 130))),
    ("lung", j.ellipsoid((30, 35, 20), (50, 62, 130))),
    ("bone", j.ellipsoid((-35, 105, 0), (17, 17, _FAR), shift=2)),
  ]
  lv_axes = _frame((0.55, -0.45, -0.7))
  heart = [
    ("right_ventricle", j.ellipsoid((-28, -18, -8), (40, 22, 32), lv_axes)),
    ("right_atrium", j.ellipsoid((-50, 15, 30), (24, 22, 26))),
    ("pulmonary_artery", j.tube([(-15, -30, 20), (-5, -32, 50), (15, -15, 80), (25, 15, 90)], 12)),
    ("myocardium", j.ellipsoid((1, -1, -1), (48, 33, 33), lv_axes, shift=1, scale=0.04)),
    ("left_atrium", j.ellipsoid((-10, 45, 35), (26, 20, 22))),
    ("aorta", j.tube([(-26, 0, 20), (-32, -4, 55), (-30, 5, 95), (-20, 25, 120)], 15)),
    ("left_ventricle", j.ellipsoid((0, 0, 0), (36, 21, 21), lv_axes, shift=0.5, scale=0.04)),
  ]
  return body, heart


def _abdominal_shapes(rng: np.random.Generator):
  """Upper abdomen in paint order; LPS mm, origin on the body axis at the kidney hila.

  The liver sits on the patient's right (-x), the spleen on the left (+x), the kidneys
  posterior (+y) beside the spine, the right one lower. The IVC runs through the back of
  the liver and the aorta in front of the spine.
  """
  j = _Jitter(rng)
  fat = rng.uniform(10.0, 25.0)
  outline = j.ellipsoid((0, 0, 0), (160, 115, _FAR), shift=2)
  body = [
    ("fat", outline),
    ("muscle", _inset(outline, fat)),
    ("lung", j.ellipsoid((-75, 35, 185), (65, 70, 75))),
    ("lung", j.ellipsoid((75, 35, 185), (65, 70, 75))),
    ("bone", j.ellipsoid((0, 75, 0), (20, 20, _FAR), shift=2)),
  ]
  organs = [
    ("liver", j.ellipsoid((-55, -5, 65), (85, 72, 70), _rotation((0, 0, 25)))),
    ("stomach", j.ellipsoid((55, -35, 55), (45, 35, 50))),
    ("spleen", j.ellipsoid((95, 40, 60), (25, 55, 45), _rotation((0, 0, -35)))),
    ("gallbladder", j.ellipsoid((-45, -55, 10), (14, 16, 28))),
    ("right_kidney", j.ellipsoid((-60, 50, -5), (28, 22, 55), _rotation((0, -15, 20)))),
    ("left_kidney", j.ellipsoid((60, 48, 10), (28, 22, 55), _rotation((0, 15, -20)))),
    ("inferior_vena_cava", j.tube([(-20, 35, -150), (-22, 38, 0), (-25, 30, 180)], 11)),
    ("aorta", j.tube([(10, 45, -150), (8, 45, 0), (5, 47, 180)], 12)),
  ]
  return body, organs


def _displacement(shape, spacing, rng: np.random.Generator, amplitude=4.0) -> np.ndarray:
  """Smooth random displacement field [3, N] (mm) that bends every outline a little.

  Each component is a sum of separable cosine products over the array axes: as smooth as
  plane waves (wavelengths 12-25 cm keep organs in one piece) but built from 1D factors, so
  it costs a few multiplications per voxel instead of trigonometry per voxel.
  """
  field = np.zeros((3, *shape), np.float32)
  for component in range(3):
    for _ in range(3):
      factors = []
      for axis, (n, step) in enumerate(zip(shape, spacing)):
        mm = np.arange(n, dtype=np.float32) * np.float32(step)
        wave = np.cos(
          mm * np.float32(2 * np.pi / rng.uniform(120.0, 250.0))
          + np.float32(rng.uniform(0.0, 2 * np.pi))
        )
        factors.append(wave.reshape([-1 if a == axis else 1 for a in range(3)]))
      amp = np.float32(rng.normal(0.0, amplitude))
      field[component] += amp * (factors[0] * factors[1]) * factors[2]
  return field.reshape(3, -1)


def _pose(points: np.ndarray, rotation, shift, scale) -> np.ndarray:
  """Patient coordinates -> an organ group's own frame (undo its shift, rotation, size)."""
  matrix = (np.asarray(rotation) / np.reshape(scale, (-1, 1))).astype(np.float32)
  return matrix @ points - matrix @ _column(shift)


def _paint(tissue_names, layers, count: int) -> np.ndarray:
  """Tissue index per point; later shapes win, which keeps the label map disjoint.

  Each shape is tested only on the points inside its bounding box: most organs fill a few
  percent of the volume, and this keeps generation at a fraction of a second per case.
  """
  tissue = np.zeros(count, np.uint8)  # index 0 is 'air'
  for points, shapes in layers:
    for name, shape in shapes:
      low, high = shape.bounds()
      candidates = np.flatnonzero(((points >= low) & (points <= high)).all(axis=0))
      tissue[candidates[shape.inside(points[:, candidates])]] = tissue_names.index(name)
  return tissue


def _cardiac_tissue(points, rng, names=_CARDIAC, more_body=None):
  """Thorax with a heart in a random pose (rotation up to 15 degrees, size +-10%)."""
  body_points = _pose(points, np.eye(3), np.zeros(3), rng.uniform(0.92, 1.08, 3))
  heart_points = _pose(
    points,
    _rotation(rng.uniform(-15.0, 15.0, 3)),
    rng.normal(0.0, 5.0, 3),
    np.full(3, rng.uniform(0.9, 1.1)),
  )
  body, heart = _cardiac_shapes(rng)
  body += more_body(_Jitter(rng)) if more_body else []  # wider fields of view see more
  return _paint(list(names), [(body_points, body), (heart_points, heart)], points.shape[1])


def _abdominal_tissue(points, rng):
  """Abdomen with a random pose (mostly about the feet-head axis) and size (+-8%)."""
  local = _pose(
    points,
    _rotation(rng.uniform((-4, -4, -10), (4, 4, 10))),
    rng.normal(0.0, 6.0, 3),
    rng.uniform(0.92, 1.08, 3),
  )
  body, organs = _abdominal_shapes(rng)
  return _paint(list(_ABDOMINAL), [(local, body + organs)], points.shape[1])


_ANATOMY = {
  "cardiac": (_CARDIAC, _cardiac_tissue, np.uint16),
  "abdominal": (_ABDOMINAL, _abdominal_tissue, np.uint8),
}


# ----------------------------------------------------------------------------- sampling


def _lps_affine(spec: _GridSpec, shape, rng: np.random.Generator) -> np.ndarray:
  """Voxel -> LPS affine: the scanner's field of view with a little random jitter."""
  zoom_inplane, zoom_slices = rng.uniform(0.95, 1.05, 2)
  fov = np.asarray(spec.fov) * (zoom_inplane, zoom_inplane, zoom_slices)
  spacing = fov / np.asarray(shape)
  directions = np.array([_AXIS_LETTERS[a] for a in spec.axes], float).T
  directions = _rotation(rng.uniform(-spec.max_tilt, spec.max_tilt, 3)) @ directions
  centre = np.asarray(spec.centre) + rng.normal(0.0, 6.0, 3)
  affine = np.eye(4)
  affine[:3, :3] = directions * spacing
  affine[:3, 3] = centre - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
  return affine


def _voxel_centres(shape, lps_affine) -> np.ndarray:
  """[3, N] float32 LPS coordinates of every voxel centre, C order."""
  index = np.indices(shape, dtype=np.float32).reshape(3, -1)
  return lps_affine[:3, :3].astype(np.float32) @ index + _column(lps_affine[:3, 3])


def _bias_field(shape, rng: np.random.Generator) -> np.ndarray:
  """Smooth multiplicative MR coil shading: exp of a random quadratic over the volume."""
  x, y, z = (np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape)
  x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
  terms = (x, y, z, x * y, x * z, y * z, x * x, y * y, z * z)
  coefficients = rng.normal(0.0, 0.08, len(terms))
  return np.exp(sum(np.float32(c) * t for c, t in zip(coefficients, terms)))


def _noise(rng: np.random.Generator, shape) -> np.ndarray:
  """Unit Gaussian noise drawn directly in float32 (half the time of float64 + cast)."""
  return rng.standard_normal(shape, dtype=np.float32)


def _render(tissue: np.ndarray, table: dict, modality: str, rng) -> np.ndarray:
  """Tissue map -> image: per-case contrast jitter, partial volume blur, bias and noise."""
  means = np.array([getattr(t, modality) for t in table.values()], np.float32)
  if modality == "ct":
    means += rng.normal(0.0, 8.0, len(means)).astype(np.float32)
  else:
    means *= rng.uniform(0.96, 1.04, len(means)).astype(np.float32)
  image = scipy.ndimage.gaussian_filter(means[tissue], 0.6)
  if modality == "ct":
    image += np.float32(rng.uniform(10.0, 18.0)) * _noise(rng, tissue.shape)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)
  image *= _bias_field(tissue.shape, rng)
  sigma = np.float32(rng.uniform(20.0, 35.0))
  real = image + sigma * _noise(rng, tissue.shape)
  imaginary = sigma * _noise(rng, tissue.shape)
  image = np.sqrt(real * real + imaginary * imaginary) * np.float32(rng.uniform(0.8, 1.5))
  return np.clip(np.rint(image), 0, _MR_MAX).astype(np.uint16)


def check_shape(shape) -> tuple[int, int, int]:
  shape = tuple(int(n) for n in shape)
  if len(shape) != 3 or min(shape) < 8:
    raise DataError(f"synthetic shape must be 3 sizes of at least 8 voxels, got {shape}")
  return shape


def make_phantom(
  anatomy: str, modality: str, shape=DEFAULT_SHAPE, *, seed: int = 0, index: int = 0
) -> Phantom:
  """One case in memory; `index` picks the case, so case k is the same whatever the count.

  Abdominal MR comes on the CHAOS DICOM grid (rows, columns, slices) with BTCV codes.
  """
  if anatomy not in ANATOMIES or modality not in MODALITIES:
    raise DataError(
      f"synthetic phantom {anatomy!r}/{modality!r} unknown: anatomy in "
      f"{ANATOMIES}, modality in {MODALITIES}"
    )
  shape = check_shape(shape)
  rng = np.random.default_rng([seed, ANATOMIES.index(anatomy), MODALITIES.index(modality), index])
  table, tissue_fn, label_dtype = _ANATOMY[anatomy]
  lps = _lps_affine(_GRIDS[anatomy, modality], shape, rng)
  spacing = np.linalg.norm(lps[:3, :3], axis=0)
  points = _voxel_centres(shape, lps) + _displacement(shape, spacing, rng)
  tissue = tissue_fn(points, rng).reshape(shape)
  codes = np.array([t.code for t in table.values()], label_dtype)
  image = _render(tissue, table, modality, rng)
  return Phantom(image, codes[tissue], RAS_FROM_LPS @ lps)
