"""Evaluation metrics on 3D volumes: Dice, ASSD and HD95 in millimetres.

Surface distances follow medpy's definitions (the ones most published tables,
including the paper's baselines, were computed with):
  * surface of a mask = its voxels with at least one background voxel among the
    6 face neighbours; voxels on the array border count as touching background
    (the mask is padded with background first), so an organ cut by the field of
    view still has a closed surface;
  * d(A->B) = for each surface voxel of A, the Euclidean distance in mm to the
    nearest surface voxel of B (`distance_transform_edt` with the voxel spacing);
  * ASSD = the mean of the distances of both surfaces pooled together,
    (sum d(P->G) + sum d(G->P)) / (|S_P| + |S_G|): the usual definition (Heimann et
    al., IEEE TMI 2009), computed so by medpy >= 0.5 and MONAI;
  * ASSD as medpy <= 0.4 computed it, (mean d(P->G) + mean d(G->P)) / 2, the mean
    of the two directed means, is `assd_mean_of_means`, for comparison with older
    tables; the two differ where one surface is much larger than the other;
  * HD95 = 95th percentile (numpy's linear interpolation) of the pooled distances
    of both directions (medpy `hd95`; MONAI takes the max of the two directed
    95th percentiles).

Empty masks, documented because they decide what a table's average means:
  * dice: both empty -> 1.0 (the structure is correctly absent), one empty -> 0.0;
  * assd / hd95: both empty -> 0.0, exactly one empty -> NaN, since no finite
    distance is correct there. Aggregate with `summarize`, which leaves NaNs out
    of mean/std and counts them, so a NaN never silently poisons or vanishes
    from an average.
"""

import math

import numpy as np
from scipy import ndimage

# Face connectivity (6-neighbourhood) for the surface definition.
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)
# The scores `structure_scores` gives each structure, in the order reports list them.
METRICS = ("dice", "assd", "hd95")


def _check_shapes(pred, gt):
  """ValueError unless both arrays are 3D with the same shape."""
  if pred.shape != gt.shape:
    raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
  if pred.ndim != 3:
    raise ValueError(f"volumes must be 3D, got shape {pred.shape}")


def _check_masks(pred, gt):
  """Boolean versions of two 3D masks of the same shape."""
  pred, gt = np.asarray(pred), np.asarray(gt)
  _check_shapes(pred, gt)
  return pred.astype(bool), gt.astype(bool)


def _check_spacing(spacing):
  """Spacing as a tuple of 3 positive finite floats (mm); ValueError otherwise."""
  try:
    values = tuple(float(s) for s in spacing)
  except (TypeError, ValueError):
    raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}") from None
  if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
    raise ValueError(f"spacing must be 3 positive numbers (mm), got {spacing!r}")
  return values


def dice(pred, gt):
  """Dice overlap 2|P & G| / (|P| + |G|).

  Both masks empty -> 1.0 (the structure is correctly absent); exactly one
  empty -> 0.0, which the formula gives by itself.
  """
  pred, gt = _check_masks(pred, gt)
  total = int(pred.sum()) + int(gt.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _surface(mask):
  """Voxels of `mask` with a background face neighbour, the array outside counting as background."""
  padded = np.pad(mask, 1, constant_values=False)
  interior = ndimage.binary_erosion(padded, structure=_FACE_NEIGHBOURS)
  return (padded & ~interior)[1:-1, 1:-1, 1:-1]


def _crop_to_union(pred, gt):
  """Both masks cropped to the bounding box of their union plus a 1-voxel margin.

  Why: the distance transform costs time proportional to the array, and a small
  structure in a large CT would otherwise pay for the whole volume. Everything
  cut away is background, the margin keeps each surface voxel's neighbours, and
  the array border is background for `_surface` anyway, so the surfaces and
  every distance between them are unchanged.
  """
  union = pred | gt
  slices = []
  for axis in range(3):
    present = np.flatnonzero(np.any(union, axis=tuple(a for a in range(3) if a != axis)))
    slices.append(slice(max(present[0] - 1, 0), present[-1] + 2))
  slices = tuple(slices)
  return pred[slices], gt[slices]


def _surface_distances(pred, gt, spacing):
  """Directed surface distances (d(P->G), d(G->P)) in mm for two non-empty masks."""
  pred, gt = _crop_to_union(pred, gt)
  surface_pred, surface_gt = _surface(pred), _surface(gt)
  to_gt = ndimage.distance_transform_edt(~surface_gt, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~surface_pred, sampling=spacing)
  return to_gt[surface_pred], to_pred[surface_gt]


def _distance_metrics(pred, gt, spacing):
  """{'assd', 'assd_mean_of_means', 'hd95'} of two checked masks, with the empty-mask rules of
  this module; the surface distances are computed once for all three."""
  pred_empty, gt_empty = not pred.any(), not gt.any()
  if pred_empty and gt_empty:
    return dict.fromkeys(DISTANCE_METRICS, 0.0)
  if pred_empty or gt_empty:
    return dict.fromkeys(DISTANCE_METRICS, float("nan"))
  pred_to_gt, gt_to_pred = _surface_distances(pred, gt, spacing)
  pooled = np.concatenate([pred_to_gt, gt_to_pred])
  return {
    "assd": float(pooled.mean()),
    "assd_mean_of_means": float((pred_to_gt.mean() + gt_to_pred.mean()) / 2.0),
    "hd95": float(np.percentile(pooled, 95)),
  }


DISTANCE_METRICS = ("assd", "assd_mean_of_means", "hd95")


def assd(pred, gt, spacing):
  """Average symmetric surface distance in mm: the mean over both surfaces' voxels of the
  distance to the other surface, (sum d(P->G) + sum d(G->P)) / (|S_P| + |S_G|).

  Both masks empty -> 0.0; exactly one empty -> NaN (see the module docstring).
  """
  pred, gt = _check_masks(pred, gt)
  return _distance_metrics(pred, gt, _check_spacing(spacing))["assd"]


def assd_mean_of_means(pred, gt, spacing):
  """ASSD as medpy <= 0.4 computed it: (mean d(P->G) + mean d(G->P)) / 2, in mm.

  Kept to compare with tables computed that way; same empty-mask rules as `assd`.
  """
  pred, gt = _check_masks(pred, gt)
  return _distance_metrics(pred, gt, _check_spacing(spacing))["assd_mean_of_means"]


def hd95(pred, gt, spacing):
  """95th percentile of the surface distances of both directions pooled, in mm.

  Both masks empty -> 0.0; exactly one empty -> NaN (see the module docstring).
  """
  pred, gt = _check_masks(pred, gt)
  return _distance_metrics(pred, gt, _check_spacing(spacing))["hd95"]


def structure_scores(pred_labels, gt_labels, spacing, class_names, metrics=METRICS, scored=None):
  """Per-structure metrics of one volume: {class_name: {metric: value}} for `metrics`, of the
  classes named in `scored` (None: every class; a reference that does not label a class
  cannot score it).

  `pred_labels` / `gt_labels` are integer label volumes of class indices and
  `class_names` lists every class with 'background' at index 0 (as the dataset
  adapters do); background is skipped because its metrics only mirror the
  foreground ones. The surface distances are computed once per class for both
  ASSD and HD95, and not at all when `metrics` names neither: they cost two
  distance transforms per class, far more than Dice (training validates on Dice
  alone for that reason).
  """
  if not metrics or any(m not in METRICS for m in metrics):
    raise ValueError(f"metrics {tuple(metrics)} must be some of {METRICS}")
  pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
  _check_shapes(pred_labels, gt_labels)
  spacing = _check_spacing(spacing)
  for name, volume in (("prediction", pred_labels), ("ground truth", gt_labels)):
    if volume.min() < 0 or volume.max() >= len(class_names):
      raise ValueError(
        f"{name} labels span [{volume.min()}, {volume.max()}], outside the "
        f"{len(class_names)} classes {tuple(class_names)}"
      )
  results = {}
  for index, name in enumerate(class_names):
    if index == 0 or (scored is not None and name not in scored):
      continue
    pred, gt = pred_labels == index, gt_labels == index
    scores = {"dice": dice(pred, gt)} if "dice" in metrics else {}
    if "assd" in metrics or "hd95" in metrics:
      scores.update(_distance_metrics(pred, gt, spacing))
    results[name] = {m: scores[m] for m in metrics}
  return results


def summarize(values):
  """Mean and std over cases, NaNs (one-sided empty masks) left out and counted.

  Returns {'mean', 'std', 'n', 'n_empty'}: `n` is the number of values that
  entered mean/std, `n_empty` the number of NaNs left out. std is the
  population std (ddof=0), as numpy computes it. With no finite value, mean and
  std are NaN and n == 0, so the report shows the gap instead of a made-up 0.
  """
  values = np.asarray(list(values), dtype=np.float64)
  missing = np.isnan(values)
  kept = values[~missing]
  if kept.size == 0:
    mean = std = float("nan")
  else:
    mean, std = float(kept.mean()), float(kept.std())
  return {"mean": mean, "std": std, "n": int(kept.size), "n_empty": int(missing.sum())}
