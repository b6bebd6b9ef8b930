"""Running an exported ukd model: jax, numpy, scipy and nibabel; no flax, optax, orbax or grain.

`ukd.serve.export` writes, per modality, the network's batch function (softmax probabilities,
mirroring TTA and ensemble averaging included, float32, any batch size) as StableHLO
(`<modality>.stablehlo`, `jax.export`) and as ONNX (`<modality>.onnx`), and `model.json`:
everything prediction needs besides (preprocessing, classes and label codes, post-processing
rules, step, ukd version).  `load(DIR)` gives an object that predicts as a `ukd.infer.Segmenter`
does, through the same `ukd.serve.windows` road, so `ukd.serve.predict.predict_paths` takes either:

    from ukd.serve import runners as exported
    model = exported.load("export/", backend="onnxruntime")
    model.predict_file("scan.nii.gz", "labels.nii.gz", "ct")

Backends: 'jax' (the StableHLO artefact, on whatever device JAX has), 'onnxruntime' and
'openvino' (the ONNX graph, on the CPU), each an optional install.  `precision='bf16'` asks
OpenVINO to compute in bfloat16, which pays only on CPUs with bf16 matrix units; elsewhere,
and for a model whose bf16 labels were not checked against float32 at export, it is refused.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ukd.data.preprocess import Preprocessing
from ukd.errors import ConfigError, DataError, error, import_extra
from ukd.serve import predict, windows

SIDECAR = "model.json"
BACKENDS = ("jax", "onnxruntime", "openvino")
# CPU flags of bf16 matrix units (Intel AMX, AVX-512 BF16); without them bf16 is emulated.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def load(path, backend: str = "jax", precision: str = "float32") -> ExportedModel:
  """The exported model in folder `path` on `backend`; a one-line error for a folder that is
  not an export, a backend that is not installed, or a precision this CPU or model refuses."""
  check_request(backend, precision)
  sidecar = os.path.join(os.fspath(path), SIDECAR)
  try:
    with open(sidecar) as f:
      record = json.load(f)
  except FileNotFoundError:
    raise error(DataError, path, f"not an exported ukd model (no {SIDECAR})") from None
  except (OSError, ValueError) as e:
    raise error(DataError, sidecar, f"unreadable ({type(e).__name__}: {e})") from None
  if precision == "bf16":
    _check_gate(record)
  return ExportedModel(os.fspath(path), record, backend, precision)


class ExportedModel(windows.Predictor):
  """An export folder's model, predicting as a `ukd.infer.Segmenter` does (`windows.Predictor`)."""

  def __init__(self, path: str, record: dict, backend: str, precision: str):
    self.path, self.record, self.backend, self.precision = path, record, backend, precision
    self.config = _Fields(record["config"])
    self.step = record.get("step")
    self.dataset = {k: record[k] for k in ("classes", "label_codes") if k in record}
    self.batch_size = int(self.config.infer.batch_size)
    self.settings = windows.Settings.from_config(
      self.config,
      _preprocessing(record, path),
      int(record["dims"]),
      self.batch_size,
      record.get("postprocess"),
    )
    self._functions = {}

  def batch_function(self, modality: str):
    """batch [N, *window, channels] float32 -> probabilities [N, *window, C] as numpy."""
    self.check_modality(modality)
    if modality not in self._functions:
      self._functions[modality] = _BUILDERS[self.backend](self, modality)
    return self._functions[modality]

  def predict_file(self, in_path, out_path, modality: str, label_codes: str = "dataset") -> None:
    """NIfTI in, label map and sidecar out, as `ukd.serve.predict.predict_file`."""
    predict.predict_file(self, in_path, out_path, modality, label_codes=label_codes)

  def _file(self, modality: str, suffix: str) -> str:
    return os.path.join(self.path, f"{modality}{suffix}")


class _Fields(dict):
  """A saved config's values as read-only attributes (`config.data.size`), lists as tuples,
  as a FrozenConfigDict gives them: the config was checked when it was exported, and the
  runner needs its values, not ml_collections."""

  def __getattr__(self, name):
    try:
      return _frozen(self[name])
    except KeyError:
      raise AttributeError(name) from None


def _frozen(value):
  if isinstance(value, dict):
    return _Fields(value)
  if isinstance(value, list):
    return tuple(_frozen(v) for v in value)
  return value


def _preprocessing(record: dict, path) -> dict:
  """{modality: Preprocessing} the sidecar holds, resolved at export."""
  if "preprocessing" not in record:
    raise error(DataError, path, "exported by an older ukd (no preprocessing record): export again")
  return {m: Preprocessing.from_record(r) for m, r in record["preprocessing"].items()}


def _jax_function(model: ExportedModel, modality: str):
  import jax
  from jax import export

  with open(model._file(modality, ".stablehlo"), "rb") as f:
    artefact = export.deserialize(bytearray(f.read()))
  call = jax.jit(artefact.call)
  device = jax.local_devices()[0]
  return lambda batch: call(jax.device_put(np.asarray(batch, np.float32), device))


def _onnxruntime_function(model: ExportedModel, modality: str):
  ort = backend_module("onnxruntime")
  session = ort.InferenceSession(model._file(modality, ".onnx"), providers=["CPUExecutionProvider"])
  name = session.get_inputs()[0].name
  return lambda batch: session.run(None, {name: np.asarray(batch, np.float32)})[0]


def _openvino_function(model: ExportedModel, modality: str):
  ov = backend_module("openvino")
  hint = {"INFERENCE_PRECISION_HINT": "bf16" if model.precision == "bf16" else "f32"}
  compiled = ov.Core().compile_model(model._file(modality, ".onnx"), "CPU", hint)
  request = compiled.create_infer_request()

  def run(batch):
    request.infer({0: np.asarray(batch, np.float32)})
    return np.array(request.get_output_tensor(0).data)

  return run


_BUILDERS = {
  "jax": _jax_function,
  "onnxruntime": _onnxruntime_function,
  "openvino": _openvino_function,
}


def backend_module(module: str, backend: str | None = None):
  """`module` for `--backend=<backend>` (default: the module itself), or the one-line error
  naming the extra that brings it: 'openvino' for OpenVINO, 'export' for the ONNX ones."""
  backend = backend or module
  extra = "openvino" if backend == "openvino" else "export"
  return import_extra(module, extra, f"--backend={backend}")


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this CPU has bf16 matrix units (Linux: its flags)."""
  try:
    with open(cpuinfo) as f:
      flags = set(f.read().split())
  except OSError:
    return False
  return any(flag in flags for flag in BF16_FLAGS)


def check_request(backend: str, precision: str) -> None:
  """A one-line ConfigError for a backend or precision this machine cannot serve, whatever
  the model: bf16 only on OpenVINO, on a CPU with bf16 units (emulated it is slower than
  float32).  `ukd.serve.export.load_backend` asks before it exports anything."""
  if backend not in BACKENDS:
    raise ConfigError(f"--backend={backend!r} must be one of {BACKENDS}")
  if precision not in ("float32", "bf16"):
    raise ConfigError(f"--precision={precision!r} must be float32 or bf16")
  if precision == "bf16" and backend != "openvino":
    raise ConfigError("--precision=bf16 runs on --backend=openvino only")
  if precision == "bf16" and not cpu_has_bf16():
    raise ConfigError(
      f"--precision=bf16: this CPU has no bf16 matrix units ({' or '.join(BF16_FLAGS)}); "
      "it would be emulated, slower than float32"
    )


def _check_gate(record: dict) -> None:
  """bf16 only for a model whose bf16 labels passed the accuracy gate at export
  (`ukd.serve.export.bf16_gate`)."""
  gate = record.get("bf16_gate") or {}
  if not gate.get("passed"):
    reason = gate.get("reason", "bf16 labels were not checked against float32 at export")
    raise ConfigError(f"--precision=bf16 refused for this model: {reason}")
