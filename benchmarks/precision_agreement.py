"""float32 vs bfloat16: train the same config in both, compare their test predictions.

  python -m benchmarks.precision_agreement --config=configs/demo.py --workdir=/tmp/precision

Trains `<workdir>/float32` and `<workdir>/bfloat16` (the config with `model.dtype` set; an
existing finished run is reused), predicts every test case of both modalities with each run's
last checkpoint (the same step; the best-by-validation step may differ between runs), and
prints the share of voxels on which the two label maps agree and each run's mean test Dice.
The mixed-precision claim to check: agreement >= 99 % and mean Dice within 0.01.
"""

import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ukd.evaluation import evaluate, metrics
from ukd.serve import segmenter as infer
from ukd.train import loop as train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/demo.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Holds the float32/ and bfloat16/ runs.")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")
DTYPES = ("float32", "bfloat16")


def compare(workdirs: dict) -> dict:
  """{'agreement': share of equal voxels over all test cases, 'dice': {dtype: {modality: mean
  Dice over cases and structures}}} for runs that share data, split and seed."""
  # The last step of both runs: the best-by-validation step can differ between them.
  segmenters = {d: infer.load(w, step="latest") for d, w in workdirs.items()}
  adapter, cases = evaluate.split_cases(segmenters["float32"], workdirs["float32"], "test")
  equal = total = 0
  dice = {d: {} for d in segmenters}
  for case in cases:
    image, label = adapter.read(case)
    predictions = {d: s.predict_volume(image, case.modality)[0] for d, s in segmenters.items()}
    equal += int(np.sum(predictions["float32"] == predictions["bfloat16"]))
    total += predictions["float32"].size
    for d, pred in predictions.items():
      scores = metrics.structure_scores(pred, label.array, image.spacing, adapter.classes)
      dice[d].setdefault(case.modality, []).append(np.mean([s["dice"] for s in scores.values()]))
  dice = {d: {m: float(np.mean(v)) for m, v in per.items()} for d, per in dice.items()}
  return {"agreement": equal / total, "dice": dice, "cases": len(cases)}


def main(argv):
  del argv
  workdirs = {d: os.path.join(_WORKDIR.value, d) for d in DTYPES}
  for dtype, workdir in workdirs.items():
    config = _CONFIG.value.copy_and_resolve_references()
    config.model.dtype = dtype
    config.data.root = (
      os.path.join(_WORKDIR.value, "phantoms")
      if config.data.synthetic.enabled
      else config.data.root
    )
    train.train_and_evaluate(config, workdir)
  result = compare(workdirs)
  result["device"] = jax.devices()[0].device_kind
  print(f"device: {result['device']}; {result['cases']} test volumes")
  print(
    f"voxels on which float32 and bfloat16 predictions agree: {100 * result['agreement']:.2f} %"
  )
  for d in DTYPES:
    print(f"mean test Dice {d}: " + ", ".join(f"{m} {v:.4f}" for m, v in result["dice"][d].items()))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
