"""Do predictions in millimetres agree across scanners' pixel sizes?

  python -m ukd.main --config=configs/demo.py --workdir=/tmp/ukd_mm --config.data.spacing=2
  python -m benchmarks.spacing_agreement --workdir=/tmp/ukd_mm

One phantom heart per modality (none the network trained on) is written twice with the same
array shape: at half the training phantoms' pixel size (the training field of view) and at
the training pixel size's equal over a field twice as wide.  Resampled to `data.spacing` the
heart is the same size in both; both predictions are compared on the fine grid (the coarse
one's nearest voxel), as Dice per structure, for the work dir's network with its own
`data.spacing` and, with the same weights, without it (every slice resized to `data.size`).
"""

import dataclasses

import ml_collections as mc
import numpy as np
from absl import app, flags

from ukd import infer
from ukd.data import phantoms, volumes

_WORKDIR = flags.DEFINE_string("workdir", None, "A work dir trained with data.spacing set.")
_SHAPE = flags.DEFINE_integer("shape", 128, "In-plane voxels of both phantoms.")
_CASE = flags.DEFINE_integer("case", 99, "Phantom index (training used the first ones).")


def _pair(modality: str, shape):
  """(fine, coarse): one phantom over the training field of view and over twice it."""
  fine = phantoms.make_phantom("cardiac", modality, shape, index=_CASE.value)
  grid = phantoms._GRIDS["cardiac", modality]
  wide = (2 * grid.fov[0], 2 * grid.fov[1], grid.fov[2])
  phantoms._GRIDS["cardiac", modality] = grid._replace(fov=wide)
  try:
    coarse = phantoms.make_phantom("cardiac", modality, shape, index=_CASE.value)
  finally:
    phantoms._GRIDS["cardiac", modality] = grid
  return fine, coarse


def _labels(seg, case, modality):
  vol = volumes.from_array(case.image.astype(np.float32), case.affine)
  return vol.to_original(seg.predict_volume(vol, modality)[0])


def _on_fine_grid(labels, fine, coarse):
  """The coarse labels at the nearest coarse voxel of every fine voxel."""
  ijk = np.stack(np.meshgrid(*(np.arange(n) for n in fine.image.shape), indexing="ij"), -1)
  points = ijk.reshape(-1, 3) @ (np.linalg.inv(coarse.affine) @ fine.affine)[:3, :3].T
  points += (np.linalg.inv(coarse.affine) @ fine.affine)[:3, 3]
  index = np.clip(np.rint(points).astype(int), 0, np.array(labels.shape) - 1)
  return labels[tuple(index.T)].reshape(fine.image.shape)


def _dice(a, b, classes):
  return [
    2 * np.sum((a == k) & (b == k)) / max(np.sum(a == k) + np.sum(b == k), 1) for k in classes
  ]


def main(argv):
  del argv
  seg = infer.load(_WORKDIR.value)
  spacing = seg.config.data.spacing
  print(f"{_WORKDIR.value}: step {seg.step}, data.spacing={spacing!r}")
  for modality in seg.config.modalities:
    fine, coarse = _pair(modality, (_SHAPE.value, _SHAPE.value, 24))
    classes = range(1, int(seg.config.model.num_classes))
    for setting in (spacing, ""):
      data = mc.ConfigDict(seg.config.data.to_dict())
      data.spacing = setting
      seg.settings = dataclasses.replace(seg.settings, data=mc.FrozenConfigDict(data))
      a = _labels(seg, fine, modality)
      b = _on_fine_grid(_labels(seg, coarse, modality), fine, coarse)
      scores = _dice(a, b, classes)
      label = f"data.spacing={setting!r}" if setting else "resized to data.size"
      print(
        f"{modality} {label:24s} agreement mean Dice {np.mean(scores):.3f} "
        f"({', '.join(f'{s:.3f}' for s in scores)})"
      )


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
