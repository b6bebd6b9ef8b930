"""`--mode=export`: a trained network as files a deployment can run without ukd's training code.

Per modality the batch function a `ukd.infer.Segmenter` runs (softmax probabilities; mirroring
TTA and ensemble averaging inside when chosen; float32; weights inside; any batch size) goes
out twice:
  * `<modality>.stablehlo`: `jax.export` with a symbolic batch, lowered for CPU, CUDA and TPU
    in one artefact, for serving from JAX;
  * `<modality>.onnx`: the format deployment stacks take (onnxruntime, OpenVINO, TensorRT,
    Triton, MONAI Deploy), written by `ukd.serve.onnx_graph` (our own converter of the jaxpr
    primitives the two networks use; see there why not jax2onnx).
`model.json` holds the rest (`ukd.exported` reads it): the checked config (preprocessing,
spacing, size, slice axis, windows), the network's dimensionality, class names and label
codes, TTA and its mirrors, the post-processing rules, the ukd version and checkpoint step,
and the outcome of the bf16 accuracy gate.

`load_backend` is what `--mode=predict --backend=...` loads: the live Segmenter for 'jax', or
for 'onnxruntime' / 'openvino' the work dir exported into a temporary folder (or an export
folder given as `--workdir`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref

import jax
import numpy as np
from absl import logging
from jax import export as jax_export

import ukd
from ukd import config as config_lib
from ukd import files, models
from ukd.errors import ConfigError, UkdError, import_extra
from ukd.evaluation import metrics
from ukd.serve import runners, segmenter

PLATFORMS = ("cpu", "cuda", "tpu")
# bf16 is allowed for a model when, on its test cases, bf16 labels agree with float32 labels
# on at least this share of voxels and move no structure's mean Dice by more than this.
BF16_MIN_AGREEMENT = 0.99
BF16_MAX_DICE_CHANGE = 0.005
BF16_GATE_CASES = 4


def export(workdir, output, *, step="best", tta: bool | None = None, postprocess="auto") -> dict:
  """Writes the export of `workdir`'s checkpoint (several, comma-separated: an ensemble) into
  `output`, which must not hold one already; returns the sidecar record."""
  import_extra("onnx", "export", "--mode=export")  # before the checkpoint loads
  from ukd.serve import onnx_graph  # imports onnx: only an export needs it

  files.check_writable(output)  # a read-only or full folder: one line before the loading

  seg = segmenter.load(workdir, step=step, tta=tta, postprocess=postprocess)
  output = os.fspath(output)
  if os.path.exists(os.path.join(output, runners.SIDECAR)):
    raise ConfigError(f"--output={output} already holds an exported model; choose another folder")
  os.makedirs(output, exist_ok=True)
  for modality in seg.config.modalities:
    fn, example = batch_function(seg, modality)
    symbolic = jax_export.symbolic_shape("batch", constraints=()) + example.shape[1:]
    spec = jax.ShapeDtypeStruct(symbolic, np.float32)
    artefact = jax_export.export(jax.jit(fn), platforms=PLATFORMS)(spec)
    files.write_bytes(os.path.join(output, f"{modality}.stablehlo"), artefact.serialize())
    graph = onnx_graph.to_onnx(fn, example, name=f"ukd_{modality}")
    files.write_bytes(os.path.join(output, f"{modality}.onnx"), graph.SerializeToString())
  record = sidecar(seg)
  record["bf16_gate"] = bf16_gate(output, record, workdir)
  files.write_json(os.path.join(output, runners.SIDECAR), record)
  logging.info("exported %s to %s", workdir, output)
  print(f"exported {', '.join(seg.config.modalities)} to {output}")
  return record


def batch_function(seg: segmenter.Segmenter, modality: str):
  """(fn, example): the Segmenter's batch function with its weights as constants, and one
  zero batch of the shape it takes (the batch axis is the one an export leaves free)."""
  variables = jax.device_get(seg.variables)
  channels = models.input_channels(seg.config.model)
  example = np.zeros((1, *models.input_spatial(seg.config), channels), np.float32)
  return (lambda batch: seg._probabilities(variables, batch, modality)), example


def sidecar(seg: segmenter.Segmenter) -> dict:
  """Everything besides the graph that predicting as `seg` does needs."""
  table = seg.label_table(seg.config.modalities[0], "index")
  record = {
    "ukd_version": ukd.__version__,
    "step": seg.step,
    "dims": seg.settings.dims,
    "config": config_lib.plain(seg.config),
    "classes": [name for _, name in table],
    "tta": seg.tta,
    "mirrors": [list(axes) for axes in seg.flips],
    "postprocess": seg.settings.postprocess,
    "inputs": {m: f"{m}.onnx" for m in seg.config.modalities},
    # Resolved here, so the runner needs no config code to prepare a volume.
    "preprocessing": {m: p.record() for m, p in seg.settings.preprocessing.items()},
  }
  if (seg.dataset or {}).get("label_codes"):
    record["label_codes"] = seg.dataset["label_codes"]
  return record


def bf16_gate(output, record: dict, workdir) -> dict:
  """Whether OpenVINO's bf16 may serve this model: on up to `BF16_GATE_CASES` test cases of
  the work dir, bf16 labels against float32 labels (agreement and mean Dice change).  Where it
  cannot be measured (no OpenVINO, no bf16 units, no test cases) it does not pass and says why."""
  if not runners.cpu_has_bf16():
    return {"passed": False, "reason": "not measured: the exporting CPU has no bf16 units"}
  try:
    import openvino  # noqa: F401
  except ImportError:
    return {"passed": False, "reason": "not measured: OpenVINO is not installed"}

  first = str(workdir).split(",")[0]
  seg = segmenter.load(first)
  try:
    adapter, cases = segmenter.split_cases(seg, first, "test")
  except UkdError as e:  # no readable test split: the export stands, bf16 is not allowed
    return {"passed": False, "reason": f"not measured: {e}"}
  cases = cases[:BF16_GATE_CASES]
  if not cases:
    return {"passed": False, "reason": "not measured: the work dir has no test cases"}
  full = runners.ExportedModel(output, record, "openvino", "float32")
  half = runners.ExportedModel(output, record, "openvino", "bf16")
  agree, change = [], []
  for case in cases:
    image, label = adapter.read(case)
    a, _ = full.predict_volume(image, case.modality)
    b, _ = half.predict_volume(image, case.modality)
    agree.append(float(np.mean(a == b)))
    for pred in (a, b):
      scores = metrics.structure_scores(pred, label.array, image.spacing, adapter.classes, ["dice"])
      change.append(float(np.nanmean([s["dice"] for s in scores.values()])))
  dice_change = float(np.max(np.abs(np.array(change[0::2]) - np.array(change[1::2]))))
  passed = min(agree) >= BF16_MIN_AGREEMENT and dice_change <= BF16_MAX_DICE_CHANGE
  result = {"passed": passed, "agreement": min(agree), "dice_change": dice_change}
  if not passed:
    result["reason"] = (
      f"bf16 labels agree with float32 on {min(agree):.2%} of voxels (needs "
      f"{BF16_MIN_AGREEMENT:.0%}) and move mean Dice by {dice_change:.4f} (at most "
      f"{BF16_MAX_DICE_CHANGE})"
    )
  return result


def load_backend(workdir, step="best", *, backend="jax", precision="float32", **options):
  """What `--mode=predict` predicts with: `infer.load` for the 'jax' backend (`options`: tta,
  postprocess); for 'onnxruntime' / 'openvino' an export folder given as `workdir`, or the
  work dir exported into a temporary folder first, removed with the model."""
  runners.check_request(backend, precision)
  if backend != "jax":
    runners.backend_module(backend)  # before a checkpoint loads or an export is written
  if os.path.exists(os.path.join(os.fspath(workdir), runners.SIDECAR)):
    return runners.load(workdir, backend=backend, precision=precision)
  if backend == "jax":
    return segmenter.load(workdir, step=step, **options)
  runners.backend_module("onnx", backend)  # the work dir is exported to ONNX first
  folder = tempfile.mkdtemp(prefix="ukd_export_")
  try:
    export(workdir, folder, step=step, **options)
    model = runners.load(folder, backend=backend, precision=precision)
  except BaseException:
    shutil.rmtree(folder, ignore_errors=True)
    raise
  # The model opens its graphs lazily, per modality: the export lives as long as the model
  # (and is removed at exit at the latest), so no run leaves tens of MB in /tmp.
  weakref.finalize(model, shutil.rmtree, folder, True)
  return model
