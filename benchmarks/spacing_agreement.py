r"""Does a network trained in millimetres give one heart one answer at any pixel size?

  python -m benchmarks.spacing_agreement --workdir=/tmp/ukd_demo [--cases=4]

Takes a work dir trained with `data.spacing` (the demo: 2 mm) and phantom hearts it never
saw (cases 100, 101, ... of the MM-WHS phantoms, each modality), each written at about 0.7 mm
in-plane (244 x 244 pixels over the phantoms' 170-185 mm field of view) and again at about
1.4 mm by taking every other pixel, so coarse pixel (i, j) is fine pixel (2i, 2j).  Prints, per
modality and structure, the Dice between the two predictions compared pixel for pixel, and each
prediction's Dice against the truth.
"""

import numpy as np
from absl import app, flags

from ukd.data.io import volumes
from ukd.data.synthetic import phantoms
from ukd.serve import segmenter as infer

flags.DEFINE_string("workdir", None, "A work dir trained with data.spacing set.")
flags.DEFINE_integer("cases", 4, "Unseen phantom cases per modality.")
flags.DEFINE_integer("slices", 40, "Slices per phantom (the demo's phantoms have 40).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS

MMWHS_CLASSES = {205: 1, 420: 2, 500: 3, 820: 4}  # MYO, LAC, LVC, AA: the demo's classes


def _dice(a, b, k) -> float:
  total = np.sum(a == k) + np.sum(b == k)
  return float(2 * np.sum((a == k) & (b == k)) / total) if total else float("nan")


def _classes(label) -> np.ndarray:
  out = np.zeros(label.shape, np.int64)
  for code, k in MMWHS_CLASSES.items():
    out[label == code] = k
  return out


def main(argv):
  del argv
  seg = infer.load(FLAGS.workdir)
  if not seg.config.data.spacing:
    raise SystemExit(f"{FLAGS.workdir} was trained without data.spacing: nothing to compare")
  names = ["MYO", "LAC", "LVC", "AA"]
  print(f"{FLAGS.workdir}: data.spacing={seg.config.data.spacing!r}")
  print("| Modality | Structure | 0.7 vs 1.4 mm | 0.7 mm vs truth | 1.4 mm vs truth |")
  print("|---|---|---|---|---|")
  for modality in seg.config.modalities:
    rows = []
    for index in range(100, 100 + FLAGS.cases):
      case = phantoms.make_phantom("cardiac", modality, (244, 244, FLAGS.slices), index=index)
      coarse_affine = case.affine.copy()
      coarse_affine[:3, :2] *= 2  # every other pixel: the same first pixel, twice the spacing
      image = case.image.astype(np.float32)
      fine = volumes.from_array(image, case.affine)
      coarse = volumes.from_array(image[::2, ::2], coarse_affine)
      predicted = [v.to_original(seg.predict_volume(v, modality)[0]) for v in (fine, coarse)]
      truth = _classes(case.label)
      rows.append(
        [
          [
            _dice(predicted[0][::2, ::2], predicted[1], k),
            _dice(predicted[0], truth, k),
            _dice(predicted[1], truth[::2, ::2], k),
          ]
          for k in range(1, 5)
        ]
      )
    means = np.nanmean(np.asarray(rows), axis=0)  # [structure, comparison]
    for name, values in zip([*names, "mean"], [*means, means.mean(axis=0)]):
      cells = " | ".join(f"{v:.3f}" for v in values)
      print(f"| {modality.upper()} | {name} | {cells} |")


if __name__ == "__main__":
  app.run(main)
