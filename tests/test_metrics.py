"""Metrics against cases whose every surface distance can be listed by hand."""

import math
import re

import numpy as np
import pytest

from ukd.evaluation import metrics


def _box(shape, x, y, z):
  mask = np.zeros(shape, bool)
  mask[x[0] : x[1], y[0] : y[1], z[0] : z[1]] = True
  return mask


def _ball(shape, radius):
  grid = np.indices(shape) - (np.array(shape) // 2)[:, None, None, None]
  return np.sum(grid**2, axis=0) <= radius**2


# ---------------------------------------------------------------- dice


def test_dice_of_overlapping_cubes():
  a = _box((8, 8, 8), (0, 4), (0, 4), (0, 4))  # 64 voxels
  half = _box((8, 8, 8), (2, 6), (0, 4), (0, 4))  # overlap 2*4*4 = 32
  quarter = _box((8, 8, 8), (2, 6), (2, 6), (0, 4))  # overlap 2*2*4 = 16
  assert metrics.dice(a, half) == 2 * 32 / 128
  assert metrics.dice(a, quarter) == 2 * 16 / 128


def test_identical_masks():
  ball = _ball((15, 15, 15), 5)
  assert metrics.dice(ball, ball) == 1.0
  assert metrics.assd(ball, ball, (1.0, 1.0, 1.0)) == 0.0
  assert metrics.hd95(ball, ball, (0.7, 0.7, 3.0)) == 0.0


# ---------------------------------------------------------------- surface distances


def test_thin_slab_shifted_along_anisotropic_axis():
  # One-voxel-thick slabs: every voxel is a surface voxel, and each one's nearest
  # partner is the voxel 3 slices away: 3 * 2.5 mm.
  spacing = (1.0, 1.0, 2.5)
  pred = _box((5, 5, 12), (1, 4), (1, 4), (3, 4))
  gt = _box((5, 5, 12), (1, 4), (1, 4), (6, 7))
  assert metrics.assd(pred, gt, spacing) == pytest.approx(7.5)
  assert metrics.hd95(pred, gt, spacing) == pytest.approx(7.5)
  # The same shift along axis 0 (1 mm voxels) measures 3 mm.
  pred_x = _box((12, 5, 5), (3, 4), (1, 4), (1, 4))
  gt_x = _box((12, 5, 5), (6, 7), (1, 4), (1, 4))
  assert metrics.assd(pred_x, gt_x, spacing) == pytest.approx(3.0)


def test_cube_shifted_by_one_slice():
  # 4x4x4 cube, shifted by one slice (2.5 mm) along axis 2. The surface has 56 voxels
  # (64 minus the 2x2x2 interior). From the first cube to the second:
  #  * its 16 bottom-face voxels are one slice below the second cube's bottom face: 2.5;
  #  * its 4 top-face voxels off the rim lie inside the second cube, 1 mm from its side walls: 1.0;
  #  * the other 36 (side walls, top rim) lie on the second cube's surface: 0.
  # The reverse direction is the mirror image.
  spacing = (1.0, 1.0, 2.5)
  pred = _box((6, 6, 8), (1, 5), (1, 5), (1, 5))
  gt = _box((6, 6, 8), (1, 5), (1, 5), (2, 6))
  one_direction = [2.5] * 16 + [1.0] * 4 + [0.0] * 36
  mean = sum(one_direction) / 56  # 44 / 56
  assert metrics.assd(pred, gt, spacing) == pytest.approx(mean)
  assert metrics.hd95(pred, gt, spacing) == pytest.approx(np.percentile(one_direction * 2, 95))
  assert metrics.hd95(pred, gt, spacing) == pytest.approx(2.5)


def test_slab_against_single_voxel_with_three_spacings():
  # pred: 3x3 slab at slice 1; gt: the voxel above the slab's centre at slice 3.
  spacing = (0.5, 2.0, 2.5)
  pred = _box((5, 5, 6), (1, 4), (1, 4), (1, 2))
  gt = _box((5, 5, 6), (2, 3), (2, 3), (3, 4))
  # From the slab (offsets dx, dy, and 2 slices = 5 mm along axis 2):
  centre = 5.0
  along_x = math.sqrt(0.5**2 + 5.0**2)  # 2 voxels
  along_y = math.sqrt(2.0**2 + 5.0**2)  # 2 voxels
  corner = math.sqrt(0.5**2 + 2.0**2 + 5.0**2)  # 4 voxels
  slab_to_voxel = [centre] + [along_x] * 2 + [along_y] * 2 + [corner] * 4
  voxel_to_slab = [5.0]  # straight down to the centre
  # Pooled: every surface voxel of both masks once, 9 + 1 distances.
  expected_assd = (sum(slab_to_voxel) + 5.0) / 10
  assert metrics.assd(pred, gt, spacing) == pytest.approx(expected_assd)
  assert metrics.assd(gt, pred, spacing) == pytest.approx(expected_assd)
  # Mean of the two directed means (medpy <= 0.4): the single voxel weighs as much as the slab.
  older = (sum(slab_to_voxel) / 9 + 5.0) / 2
  assert metrics.assd_mean_of_means(pred, gt, spacing) == pytest.approx(older)
  assert abs(older - expected_assd) > 0.05
  expected_hd95 = np.percentile(slab_to_voxel + voxel_to_slab, 95)
  assert metrics.hd95(pred, gt, spacing) == pytest.approx(expected_hd95)


def test_directions_are_pooled_as_in_medpy_05_and_monai():
  # gt = pred (a 5x5 one-voxel slab) plus a 2-voxel outlier 4 slices (10 mm) above it.
  # pred -> gt: 25 zeros. gt -> pred: 25 zeros and 2 x 10 mm.
  spacing = (1.0, 1.0, 2.5)
  pred = _box((7, 7, 8), (1, 6), (1, 6), (1, 2))
  gt = pred | _box((7, 7, 8), (3, 4), (3, 5), (5, 6))
  pred_to_gt = [0.0] * 25
  gt_to_pred = [0.0] * 25 + [10.0] * 2
  # Pooled (Heimann 2009, medpy >= 0.5, MONAI): 20 mm over 52 surface voxels.
  assert metrics.assd(pred, gt, spacing) == pytest.approx(20 / 52)
  # The older mean of the two directed means: (0 + 20/27) / 2.
  assert metrics.assd_mean_of_means(pred, gt, spacing) == pytest.approx((0.0 + 20 / 27) / 2)
  # Pooled 95th percentile: 2 large values out of 52 -> 0 (the max of the two
  # directed 95th percentiles would give 7.0).
  assert metrics.hd95(pred, gt, spacing) == pytest.approx(
    np.percentile(pred_to_gt + gt_to_pred, 95)
  )
  assert metrics.hd95(pred, gt, spacing) == 0.0


def test_array_border_counts_as_background():
  # A mask filling the whole 3x3x3 array has 26 surface voxels (all but the centre),
  # because outside the array is background. Against the centre voxel alone:
  # 6 face voxels at 1, 12 edge voxels at sqrt 2, 8 corners at sqrt 3; back: 1.
  full = np.ones((3, 3, 3), bool)
  centre = np.zeros((3, 3, 3), bool)
  centre[1, 1, 1] = True
  to_centre = [1.0] * 6 + [math.sqrt(2)] * 12 + [math.sqrt(3)] * 8
  expected = (sum(to_centre) + 1.0) / 27
  assert metrics.assd(full, centre, (1, 1, 1)) == pytest.approx(expected)
  older = (sum(to_centre) / 26 + 1.0) / 2
  assert metrics.assd_mean_of_means(full, centre, (1, 1, 1)) == pytest.approx(older)
  assert metrics.hd95(full, centre, (1, 1, 1)) == pytest.approx(
    np.percentile(to_centre + [1.0], 95)
  )


# ---------------------------------------------------------------- empty masks


def test_empty_masks():
  empty = np.zeros((4, 4, 4), bool)
  cube = _box((4, 4, 4), (1, 3), (1, 3), (1, 3))
  assert metrics.dice(empty, empty) == 1.0
  assert metrics.dice(cube, empty) == 0.0
  assert metrics.assd(empty, empty, (1, 1, 1)) == 0.0
  assert metrics.hd95(empty, empty, (1, 1, 1)) == 0.0
  assert math.isnan(metrics.assd(cube, empty, (1, 1, 1)))
  assert math.isnan(metrics.hd95(empty, cube, (1, 1, 1)))


def test_summarize_leaves_nan_out_and_counts_it():
  summary = metrics.summarize([1.0, float("nan"), 3.0])
  assert summary == {"mean": 2.0, "std": 1.0, "n": 2, "n_empty": 1}
  nothing = metrics.summarize([float("nan")])
  assert nothing["n"] == 0 and nothing["n_empty"] == 1 and math.isnan(nothing["mean"])


# ---------------------------------------------------------------- structure_scores


def test_evaluate_case_per_foreground_class():
  shape = (6, 6, 6)
  gt = np.zeros(shape, np.int32)
  gt[_box(shape, (0, 3), (0, 3), (0, 3))] = 1
  gt[_box(shape, (4, 6), (4, 6), (4, 6))] = 2
  pred = np.where(gt == 1, 1, 0)  # structure 2 missed, structure 3 absent in both
  result = metrics.structure_scores(pred, gt, (1.0, 1.0, 2.0), ("background", "a", "b", "c"))
  assert list(result) == ["a", "b", "c"]
  assert result["a"] == {"dice": 1.0, "assd": 0.0, "hd95": 0.0}
  assert result["b"]["dice"] == 0.0
  assert math.isnan(result["b"]["assd"]) and math.isnan(result["b"]["hd95"])
  assert result["c"] == {"dice": 1.0, "assd": 0.0, "hd95": 0.0}


def test_evaluate_case_rejects_labels_beyond_the_classes():
  labels = np.full((2, 2, 2), 3, np.int32)
  with pytest.raises(ValueError, match="outside"):
    metrics.structure_scores(labels, labels, (1, 1, 1), ("background", "a"))


# ---------------------------------------------------------------- input checks


@pytest.mark.parametrize(
  "spacing",
  [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0), (1.0, float("nan"), 1.0), None, ("a", 1, 1)],
)
def test_bad_spacing(spacing):
  cube = _box((4, 4, 4), (1, 3), (1, 3), (1, 3))
  with pytest.raises(ValueError, match="spacing"):
    metrics.assd(cube, cube, spacing)
  with pytest.raises(ValueError, match="spacing"):
    metrics.structure_scores(cube.astype(int), cube.astype(int), spacing, ("background", "a"))


def test_shape_mismatch_names_both_shapes():
  with pytest.raises(ValueError, match=re.escape("(4, 4, 4)") + ".*" + re.escape("(4, 4, 5)")):
    metrics.dice(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
  with pytest.raises(ValueError, match="3D"):
    metrics.hd95(np.zeros((4, 4), bool), np.zeros((4, 4), bool), (1, 1, 1))


def test_dice_only_scores_skip_the_surface_distances(monkeypatch):
  shape = (6, 6, 6)
  gt = np.zeros(shape, np.int32)
  gt[_box(shape, (0, 3), (0, 3), (0, 3))] = 1  # 27 voxels
  pred = np.zeros(shape, np.int32)
  pred[_box(shape, (0, 3), (0, 3), (0, 2))] = 1  # 18 voxels, all inside
  monkeypatch.setattr(metrics, "_distance_metrics", None)  # any distance call would fail
  result = metrics.structure_scores(pred, gt, (1.0, 1.0, 1.0), ("background", "a"), ("dice",))
  assert result == {"a": {"dice": 2 * 18 / (27 + 18)}}
  with pytest.raises(ValueError, match="must be some of"):
    metrics.structure_scores(pred, gt, (1.0, 1.0, 1.0), ("background", "a"), ("iou",))
