"""Inference and prediction of files: geometry round trip, batching, sliding windows,
compilation reuse, checkpoints, output names."""

import json
import os
import tracemalloc

import jax
import nibabel as nib
import numpy as np
import pytest
from helpers import (
  OBLIQUE_LPS,
  PATCH,
  RECORD,
  STEP,
  ct_like,
  infer_config,
  new_state,
  on_devices,
  save_nifti,
  variables_of,
)

from ukd import config as config_lib
from ukd import models
from ukd.data import preprocess
from ukd.data.adapters import Adapter, Case
from ukd.data.io import volumes
from ukd.errors import CheckpointError, ConfigError, DataError
from ukd.evaluation import evaluate
from ukd.runtime import checkpoints
from ukd.serve import predict, windows
from ukd.serve import segmenter as infer


def _zeros_like_network(config):
  """params and batch_stats of the config's network as zeros: a checkpoint's structure, free."""
  model = models.build(config.model, config.modalities)
  shapes = jax.eval_shape(
    lambda: models.init_variables(
      model, config.model, models.input_spatial(config), jax.random.key(0)
    )
  )
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def state2d():
  config = infer_config()
  return config, new_state(config)


@pytest.fixture(scope="module")
def seg(state2d):
  config, state = state2d
  return infer.Segmenter(config, variables_of(state))


@pytest.fixture(scope="module")
def workdir(state2d, tmp_path_factory):
  """A work dir holding the module's state as checkpoint STEP, saved as training saves it."""
  config, state = state2d
  path = str(tmp_path_factory.mktemp("run"))
  mgr = checkpoints.manager(path)
  checkpoints.save(mgr, STEP, state, config, dataset=RECORD)
  mgr.wait_until_finished()
  mgr.close()
  return path


@pytest.fixture(scope="module")
def seg3d():
  config = infer_config("unet3d")
  return infer.Segmenter(config, variables_of(new_state(config)))


# --- geometry --------------------------------------------------------------------------------------


def test_predict_file_writes_onto_the_input_grid(seg, tmp_path):
  original = ct_like((6, 20, 12))
  source = save_nifti(original, OBLIQUE_LPS, tmp_path / "scan.nii.gz")
  out = str(tmp_path / "out" / "pred.nii.gz")
  probs_path = str(tmp_path / "out" / "probs.nii.gz")
  predict.predict_file(seg, source, out, "ct", probabilities=probs_path)

  written = nib.load(out)
  assert written.shape == original.shape
  assert np.array_equal(written.affine, nib.load(source).affine)
  assert written.get_data_dtype() == np.uint8
  labels = np.asarray(written.dataobj)

  canonical, _ = seg.predict_volume(volumes.read_image(source), "ct")
  assert canonical.shape == (20, 12, 6)  # (R, A, S) from voxel axes (L, P, S)
  assert len(np.unique(canonical)) > 1
  # By hand: canonical R and A run against voxel axes 1 and 2; S is voxel axis 0.
  assert np.array_equal(labels, np.transpose(canonical[::-1, ::-1, :], (2, 0, 1)))

  probs = np.asarray(nib.load(probs_path).dataobj)
  assert probs.shape == original.shape + (3,) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  assert np.array_equal(np.argmax(probs, -1), labels)
  assert np.array_equal(seg.predict(original, "ct", affine=OBLIQUE_LPS), labels)


def test_spacing_alone_means_an_axis_aligned_ras_array(seg):
  volume = ct_like((16, 16, 5))
  assert np.array_equal(
    seg.predict(volume, "ct", spacing=(2.0, 2.0, 3.0)), seg.predict(volume, "ct")
  )


# --- batching and compilation ------------------------------------------------------------------


def test_results_do_not_depend_on_the_batch_size(state2d):
  config, state = state2d
  volume = volumes.from_array(ct_like((16, 16, 10), seed=1))
  results = []
  for batch in (1, 7):
    config = infer_config(batch=batch)
    seg = infer.Segmenter(config, variables_of(state))
    results.append(seg.predict_volume(volume, "mr", probabilities=True))
  assert np.array_equal(results[0][0], results[1][0])
  np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-6)


def test_volumes_of_any_slice_count_and_new_weights_reuse_the_compiled_network(seg):
  seg.predict(ct_like((16, 16, 9)), "ct")
  original = jax.device_get(seg.variables)
  compiles = []

  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.jit(lambda x: x * 3 + 1)(np.ones(5))  # the listener does see compilations
    assert len(compiles) == 1
    seg.predict(ct_like((16, 16, 9), seed=2), "ct")
    seg.predict(ct_like((20, 12, 13), seed=3), "ct")
    # Training's validations: the run's one Segmenter takes each step's weights.
    seg.update(jax.tree.map(lambda x: np.asarray(x) * 1.01, original))
    seg.predict(ct_like((16, 16, 9), seed=4), "ct")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    seg.update(original)  # the fixture is shared
  assert len(compiles) == 1


# --- 3D sliding windows ------------------------------------------------------------------------


def test_gaussian_importance_peaks_at_the_centre_with_sigma_an_eighth():
  weights = windows.gaussian_importance((16, 1, 8))
  assert weights.shape == (16, 1, 8) and weights.max() == 1.0
  profile = weights[:, 0, 3]
  expected = np.exp(-0.5 * ((np.arange(16) - 7.5) / 2.0) ** 2)
  np.testing.assert_allclose(profile / profile.max(), expected / expected.max(), rtol=1e-6)
  np.testing.assert_allclose(weights, weights[::-1, :, ::-1])


def test_window_starts_cover_the_volume_with_the_overlap():
  assert windows.window_starts(8, 8, 0.5) == [0]
  assert windows.window_starts(20, 8, 0.5) == [0, 4, 8, 12]
  assert windows.window_starts(21, 8, 0.5) == [0, 3, 6, 10, 13]
  assert windows.window_starts(24, 8, 0.0) == [0, 8, 16]


def test_one_window_equals_whole_volume_inference(seg3d):
  volume = volumes.from_array(ct_like(PATCH))
  labels, probs = seg3d.predict_volume(volume, "ct", probabilities=True)

  prepared = preprocess.prepare(volume, None, seg3d.settings.preprocessing["ct"])
  model = models.build(seg3d.config.model, seg3d.config.modalities)
  apply = jax.jit(lambda v, x: model.apply(v, x, modality="ct"))  # compiles faster than eager
  logits = apply(seg3d.variables[0], prepared.image[None, ..., None])
  direct = preprocess.restore(
    np.asarray(jax.nn.softmax(logits[0])), prepared.geometry, is_label=False
  )
  np.testing.assert_allclose(probs, direct, atol=1e-5)
  assert np.array_equal(labels, np.argmax(direct, -1))


@pytest.mark.parametrize("slices", [5, 20])
def test_sliding_windows_are_batch_invariant_on_any_slice_count(seg3d, slices):
  volume = volumes.from_array(ct_like((16, 16, slices)))
  results = [
    infer.Segmenter(infer_config("unet3d", batch=b), seg3d.variables).predict_volume(
      volume, "mr", probabilities=True
    )
    for b in (1, 3)
  ]
  assert results[0][1].shape == (16, 16, slices, 3)
  np.testing.assert_allclose(results[0][1].sum(-1), 1.0, atol=1e-5)
  assert np.array_equal(results[0][0], results[1][0])
  np.testing.assert_allclose(results[0][1], results[1][1], atol=1e-6)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "call, message",
  [
    (lambda s, d: s.predict(np.zeros((16, 16, 4)), "pet"), r"modality 'pet'.*\['ct', 'mr'\]"),
    (lambda s, d: s.predict(np.zeros((16, 16)), "ct"), r"expected a 3D volume, got shape"),
    (lambda s, d: s.predict(np.full((16, 16, 4), np.nan), "ct"), r"NaN"),
    (lambda s, d: s.predict(np.zeros((16, 16, 4)), "ct", spacing=(1, 2)), r"spacing must be 3"),
    (
      lambda s, d: predict.predict_file(s, f"{d}/missing.nii.gz", f"{d}/o.nii.gz", "ct"),
      "file not found",
    ),
    (lambda s, d: predict.predict_paths(s, d, f"{d}/out", "ct"), r"no \.nii or \.nii\.gz files"),
    (lambda s, d: predict.predict_paths(s, f"{d}/nowhere", f"{d}/out", "ct"), "input not found"),
    (lambda s, d: predict.predict_paths(s, d, f"{d}/out", "pet"), r"modality 'pet'"),
  ],
)
def test_bad_input_gives_a_one_line_error(seg, tmp_path, call, message):
  with pytest.raises(DataError, match=message) as error:
    call(seg, str(tmp_path))
  assert "\n" not in str(error.value)


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("batch_size", 0, "config.infer.batch_size=0 must be a positive number"),
    ("overlap", 1.0, "config.infer.overlap=1.0 must be in [0, 1)"),
  ],
)
def test_inference_settings_are_checked_with_the_config(field, value, message):
  config = infer_config()
  config.infer[field] = value
  with pytest.raises(ConfigError) as error:
    config_lib.check(config)
  assert str(error.value) == message


# --- files and folders (ukd.serve.predict) -------------------------------------------------------


def test_predict_paths_names_outputs_after_the_cases(seg, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  save_nifti(ct_like((16, 16, 4)), OBLIQUE_LPS, inputs / "b.nii")
  save_nifti(ct_like((12, 16, 6)), np.diag([-1.0, -1.0, 2.0, 1.0]), inputs / "a_0000.nii.gz")
  (inputs / "notes.txt").write_text("not an image")
  out = tmp_path / "out"
  written = predict.predict_paths(seg, str(inputs), str(out), "ct", probabilities=True)
  assert written == [
    str(out / n)
    for n in ("a.nii.gz", "a_probabilities.nii.gz", "a.json")
    + ("b.nii.gz", "b_probabilities.nii.gz", "b.json")
  ]
  assert nib.load(written[3]).shape == (16, 16, 4)
  again = predict.predict_paths(seg, str(inputs / "b.nii"), str(out), "ct", overwrite=True)
  assert again == [str(out / "b.nii.gz"), str(out / "b.json")]


# --- checkpoints ---------------------------------------------------------------------------


def test_load_predicts_like_the_live_variables(seg, workdir):
  volume = ct_like((16, 16, 6), seed=5)
  expected = seg.predict_volume(volumes.from_array(volume), "mr", probabilities=True)
  ckpt = os.path.join(workdir, "checkpoints")
  for path in (workdir, ckpt, os.path.join(ckpt, str(STEP))):
    loaded = infer.load(path)
    assert loaded.step == STEP
    assert list(loaded.config.modalities) == ["ct", "mr"]
    labels, probs = loaded.predict_volume(volumes.from_array(volume), "mr", probabilities=True)
    assert np.array_equal(labels, expected[0]) and np.array_equal(probs, expected[1])


@pytest.mark.parametrize(
  "path, step, message",
  [
    ("", "best", "holds no checkpoints"),
    ("checkpoints", "best", "no checkpoint in"),
  ],
)
def test_a_dir_without_checkpoints_is_refused(tmp_path, path, step, message):
  os.makedirs(tmp_path / path, exist_ok=True)
  with pytest.raises(CheckpointError, match=message):
    infer.load(str(tmp_path / path), step=step)


@pytest.mark.parametrize(
  "sub, step, message",
  [
    (f"checkpoints/{STEP}", "latest", f"is step {STEP}, but step='latest'"),
    ("", 7, "no checkpoint for step 7"),
  ],
)
def test_an_unknown_step_is_refused(workdir, sub, step, message):
  with pytest.raises(CheckpointError, match=message):
    infer.load(os.path.join(workdir, sub), step=step)


@pytest.mark.parametrize("change", ["width", "scheme"])
# Orbax's restore thread, stopped by the misfit, later posts to its closed asyncio loop; the
# user sees one `ukd: error:` line (test_cli), the test process an "unraisable" warning.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_that_does_not_fit_its_config_is_refused(tmp_path, change):
  saved_config = infer_config()
  trained = infer_config(width=4)
  if change == "scheme":
    trained = infer_config()
    trained.model.scheme = "joint"  # shared norms: no per-modality statistics to restore
  mgr = checkpoints.manager(str(tmp_path))
  checkpoints.save(mgr, 1, _zeros_like_network(trained), saved_config)
  mgr.wait_until_finished()
  mgr.close()
  with pytest.raises(CheckpointError, match="does not fit") as error:
    infer.load(str(tmp_path))
  assert "\n" not in str(error.value)


# --- several devices -----------------------------------------------------------------------

_MULTI_DEVICE = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from ukd import models
from ukd.serve import segmenter as infer
from ukd.runtime import mesh
from ukd.data.io import volumes
config = tiny_config()
config.data.size = (16, 16)
config.infer.batch_size = 4
model = models.build(config.model, config.modalities)
variables = jax.jit(lambda k: models.init_variables(model, config.model, (16, 16), k))(
    jax.random.key(0))
volume = np.random.default_rng(0).normal(0, 300, (16, 16, 7)).astype(np.float32)
out = {{}}
for n in (1, 3):
  seg = infer.Segmenter(config, variables, mesh.make_mesh(jax.devices()[:n]))
  labels, probs = seg.predict_volume(volumes.from_array(volume), "ct", probabilities=True)
  out[n] = (seg.batch_size, labels, probs)
print(json.dumps(dict(devices=len(jax.devices()), batch=out[3][0],
                      labels_equal=bool(np.array_equal(out[1][1], out[3][1])),
                      probs_diff=float(np.abs(out[1][2] - out[3][2]).max()))))
"""


def test_batches_are_sharded_over_several_devices():
  result = on_devices(3, "-c", _MULTI_DEVICE.format(tests=os.path.dirname(__file__)))
  assert result["devices"] == 3
  assert result["batch"] == 6  # 4 rounded up to a multiple of the 3 devices
  assert result["labels_equal"] and result["probs_diff"] < 1e-5


# --- people's files ---------------------------------------------------------------------------


def _nnunet_inputs(folder):
  """imagesTr as nnU-Net names it: `case_0000.nii.gz`, whose label is `case.nii.gz`."""
  folder.mkdir()
  for name in ("a_0000.nii.gz", "b_0000.nii.gz"):
    save_nifti(ct_like((16, 16, 4)), OBLIQUE_LPS, folder / name)
  return folder


def test_predicting_into_a_folder_with_those_names_refuses_before_any_work(seg, tmp_path):
  inputs = _nnunet_inputs(tmp_path / "imagesTr")
  labels = tmp_path / "labelsTr"
  labels.mkdir()
  (labels / "b.nii.gz").write_bytes(b"ground truth")
  with pytest.raises(DataError) as error:
    predict.predict_paths(seg, str(inputs), str(labels), "ct")
  assert (
    str(error.value)
    == f"{labels / 'b.nii.gz'}: already exists; pass --overwrite to replace it or --continue"
  )
  assert sorted(os.listdir(labels)) == ["b.nii.gz"]  # not even a.nii.gz was predicted
  assert (labels / "b.nii.gz").read_bytes() == b"ground truth"
  written = predict.predict_paths(seg, str(inputs), str(labels), "ct", overwrite=True)
  assert len(written) == 4 and nib.load(labels / "b.nii.gz").shape == (16, 16, 4)
  for name in ("a.nii.gz", "a.json", "b.nii.gz"):
    (labels / name).unlink()  # b.json alone, the sidecar, is refused as well
  with pytest.raises(DataError, match=r"b\.json: already exists"):
    predict.predict_paths(seg, str(inputs), str(labels), "ct")


def test_files_hold_the_datasets_label_codes_and_name_them(seg, workdir, tmp_path):
  loaded = infer.load(workdir)
  assert loaded.dataset == RECORD
  assert loaded.label_table("ct") == [(0, "background"), (205, "MYO"), (820, "AA")]
  assert loaded.label_table("mr") == [(0, "background"), (63, "MYO"), (126, "AA")]
  assert loaded.label_table("ct", "index") == [(0, "background"), (1, "MYO"), (2, "AA")]
  source = save_nifti(ct_like((6, 20, 12)), OBLIQUE_LPS, tmp_path / "scan.nii.gz")
  predict.predict_file(loaded, source, tmp_path / "codes.nii.gz", "ct")
  predict.predict_file(loaded, source, tmp_path / "index.nii.gz", "ct", label_codes="index")
  codes, index = (nib.load(tmp_path / f"{n}.nii.gz") for n in ("codes", "index"))
  assert codes.get_data_dtype() == np.uint16 and index.get_data_dtype() == np.uint8
  index = np.asarray(index.dataobj)
  assert set(np.unique(index)) == {0, 1, 2}  # the random network predicts every class here
  assert np.array_equal(np.asarray(codes.dataobj), np.array([0, 205, 820])[index])
  with open(tmp_path / "codes.json") as f:
    assert json.load(f)["classes"] == {"0": "background", "205": "MYO", "820": "AA"}
  with open(tmp_path / "index.json") as f:
    assert json.load(f)["classes"] == {"0": "background", "1": "MYO", "2": "AA"}
  # Live variables know no dataset: class indices, with placeholder names.
  assert seg.label_table("ct") == [(0, "background"), (1, "class_1"), (2, "class_2")]
  with pytest.raises(ConfigError, match="label_codes='raw' must be one of"):
    predict.predict_paths(seg, source, tmp_path / "out", "ct", label_codes="raw")


def test_evaluation_predicts_from_the_image_alone(state2d, monkeypatch):
  """Scored against two different labels, a case gets the same prediction, which is the one
  the image alone gives (the crop included)."""
  _, state = state2d
  config = infer_config()
  config.data.crop = "body"
  seg = infer.Segmenter(config, variables_of(state))
  image = volumes.from_array(ct_like((16, 16, 6), seed=7))
  expected, _ = seg.predict_volume(image, "ct")
  near, far = np.zeros((16, 16, 6), np.int32), np.zeros((16, 16, 6), np.int32)
  near[2:6, 2:6, 1:4], far[9:15, 8:14, 2:5] = 1, 2

  class OneCase(Adapter):
    classes = ("background", "A", "B")

    def __init__(self, label):
      self.label = label

    def read(self, case):
      return image, volumes.from_array(self.label)

  predicted = []
  real = seg.predict_volume

  def recording(vol, modality, **options):
    result = real(vol, modality, **options)
    predicted.append(result[0])
    return result

  monkeypatch.setattr(seg, "predict_volume", recording)
  case = Case("c", "ct", "c.nii.gz", "c_label.nii.gz")
  for label in (near, far):
    evaluate.evaluate_cases(seg, OneCase(label), [case], overlays=False)
  assert len(predicted) == 2
  assert all(np.array_equal(p, expected) for p in predicted)


def test_large_volumes_are_restored_a_run_of_slices_at_a_time(seg, monkeypatch):
  """Peak host memory of a prediction, above the volume itself, stays a few bytes per voxel.

  Volume V = 96 x 96 x 160 voxels (float32, 4V bytes), C = 3 classes, network 16 x 16.
  Restoring all probabilities at once holds them at full resolution twice (resized, then
  placed into the uncropped grid): 2 x 4CV = 24V bytes.  In runs of slices the peak is
  normalising the image (a float32 copy and one temporary: 8V), then the labels (V) and one
  run of slices (a tenth of the volume here: 24V / 10 and an int64 argmax of it, 0.8V):
  under 12V bytes, at most half the old peak whatever C.
  """
  shape, classes = (96, 96, 160), 3
  voxels = int(np.prod(shape))
  monkeypatch.setattr(
    preprocess, "RESTORE_CHUNK_BYTES", shape[0] * shape[1] * classes * 4 * shape[2] // 10
  )
  volume = volumes.from_array(ct_like(shape, seed=3))
  seg.predict_volume(volumes.from_array(ct_like((16, 16, 9))), "ct")  # compiled beforehand
  prepared = preprocess.prepare(volume, None, seg.settings.preprocessing["ct"])
  network = windows.network_probabilities(prepared.image, seg.settings, seg.batch_function("ct"))

  def peak_bytes(run):
    tracemalloc.start()
    try:
      before = tracemalloc.get_traced_memory()[0]
      result = run()
      return result, tracemalloc.get_traced_memory()[1] - before
    finally:
      tracemalloc.stop()

  (labels, probs), peak = peak_bytes(lambda: seg.predict_volume(volume, "ct"))
  assert probs is None and labels.shape == shape and labels.dtype == np.uint8
  assert peak < 12 * voxels, peak / voxels
  at_once, old_peak = peak_bytes(
    lambda: np.argmax(preprocess.restore(network, prepared.geometry, is_label=False), -1)
  )
  assert old_peak >= 2 * 4 * classes * voxels, old_peak / voxels  # the bound tells them apart
  assert np.array_equal(labels, at_once)
