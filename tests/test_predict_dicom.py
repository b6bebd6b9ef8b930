"""Prediction of DICOM series, study trees and dataset layouts; DICOM-SEG out; the sidecar's
seconds and class volumes."""

import json
import os

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from helpers import (
  OBLIQUE_AFFINE,
  RECORD,
  STEP,
  ct_like,
  infer_config,
  new_state,
  run_module,
  save_nifti,
  variables_of,
)

from ukd import config as config_lib
from ukd.data.io import dicom_seg, dicom_series, volumes
from ukd.errors import ConfigError, DataError
from ukd.runtime import checkpoints
from ukd.serve import inputs as predict_inputs
from ukd.serve import predict
from ukd.serve import segmenter as infer

pytest.importorskip("highdicom")
from ukd.data.synthetic import dicom_write  # noqa: E402

SHAPE = (16, 16, 5)  # columns, rows, slices on disk
AFFINE = OBLIQUE_AFFINE  # 0.8 x 0.7 x 2.5 mm voxels (1.4 mm^3)
VOXEL_MM3 = 0.8 * 0.7 * 2.5
CODES = {0: 0, 205: 1, 820: 2}  # RECORD's CT codes -> class index


@pytest.fixture(scope="module")
def state():
  config = infer_config()
  return config, new_state(config)


@pytest.fixture(scope="module")
def seg(state):
  """A network that knows its dataset (MM-WHS classes MYO and AA) and checkpoint step."""
  config, train_state = state
  segmenter = infer.Segmenter(config, variables_of(train_state), step=STEP)
  segmenter.dataset = RECORD
  return segmenter


def _scan(folder, name="scan.nii.gz", seed=0):
  """Whole HU values, which a DICOM series stores exactly."""
  folder.mkdir(parents=True, exist_ok=True)
  return save_nifti(np.round(ct_like(SHAPE, seed)), AFFINE, folder / name)


def _series(nifti, folder, **kwargs):
  dicom_write.write_series(volumes.read_image(nifti), folder, **kwargs)
  return str(folder)


def _data(path):
  return np.asarray(nib.load(path).dataobj)


def _json(path):
  with open(path) as f:
    return json.load(f)


def test_a_series_predicts_exactly_the_labels_of_its_nifti(seg, tmp_path, capsys):
  import pydicom

  nifti = _scan(tmp_path)
  folder = _series(nifti, tmp_path / "ct")
  scout = pydicom.dcmread(os.path.join(folder, "IM00001.dcm"))
  scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
  scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  scout.save_as(os.path.join(folder, "scout"))

  predict.predict_paths(seg, nifti, tmp_path / "from_nifti", "ct")
  written = predict.predict_paths(seg, folder, tmp_path / "from_dicom")  # CT tag -> ct
  out = tmp_path / "from_dicom"
  assert written == [str(out / "ct.nii.gz"), str(out / "ct.json")]
  expected = _data(tmp_path / "from_nifti" / "scan.nii.gz")
  assert len(np.unique(expected)) > 1
  np.testing.assert_array_equal(_data(out / "ct.nii.gz"), expected)
  np.testing.assert_allclose(nib.load(out / "ct.nii.gz").affine, AFFINE, atol=1e-4)
  assert f"series ct in {folder}: skipped localizer scout (ImageType LOCALIZER)\n" in (
    capsys.readouterr().out
  )

  sidecar = _json(out / "ct.json")
  header = pydicom.dcmread(os.path.join(folder, "IM00001.dcm"))
  assert sidecar["SeriesInstanceUID"] == header.SeriesInstanceUID
  assert sidecar["StudyInstanceUID"] == header.StudyInstanceUID
  assert (sidecar["source_files"], sidecar["modality"]) == (5, "ct")  # the scout is no source
  assert isinstance(sidecar["seconds"], float) and sidecar["seconds"] > 0
  # Volumes by hand: voxels of each code times 0.8 * 0.7 * 2.5 mm^3.
  hand = {
    name: float((expected == code).sum()) * VOXEL_MM3
    for code, name in zip((0, 205, 820), RECORD["classes"])
  }
  # (The series' spacing is a decimal string: 0.8 comes back to within 1e-8.)
  assert sidecar["volumes_mm3"] == pytest.approx(hand, rel=1e-7)
  assert sum(sidecar["volumes_mm3"].values()) == pytest.approx(16 * 16 * 5 * VOXEL_MM3)


def test_class_volumes_are_voxel_counts_times_the_voxel_volume():
  labels = np.array([[[0, 1], [1, 2]], [[1, 1], [0, 0]]])
  assert predict.class_volumes(labels, (0.5, 2.0, 3.0), ["background", "a", "b", "c"]) == {
    "background": 9.0,  # 3 voxels of 3 mm^3
    "a": 12.0,
    "b": 3.0,
    "c": 0.0,
  }


def test_the_modality_comes_from_the_tag_through_the_config_table(state, tmp_path):
  import pydicom

  _, train_state = state
  config = infer_config()
  config.infer.dicom_modalities = {"CT": "mr"}
  seg = infer.Segmenter(config, variables_of(train_state))
  folder = _series(_scan(tmp_path), tmp_path / "scan")
  predict.predict_paths(seg, folder, tmp_path / "out")
  assert _json(tmp_path / "out" / "scan.json")["modality"] == "mr"
  for path in dicom_series.find_series(folder)[0].files:
    ds = pydicom.dcmread(path)
    ds.Modality = "PT"
    ds.save_as(path)
  with pytest.raises(DataError) as caught:
    predict.predict_paths(seg, folder, tmp_path / "out", overwrite=True)
  assert str(caught.value).startswith(
    f"series scan in {folder}: DICOM Modality 'PT' is not a modality the model was trained on"
  )
  assert "\n" not in str(caught.value)


def test_a_checkpoints_config_without_newer_fields_gets_their_defaults():
  saved = infer_config().to_dict()
  del saved["infer"]["dicom_modalities"]
  restored = config_lib.frozen(saved)
  assert dict(restored.infer.dicom_modalities) == {"CT": "ct", "MR": "mr"}
  assert restored.infer.batch_size == 8  # saved fields keep their values


def test_dataset_layouts_predict_images_only_named_as_their_labels(seg, tmp_path, capsys):
  mmwhs = tmp_path / "ct_train"
  for case in ("ct_train_1001", "ct_train_1002"):
    _scan(mmwhs, f"{case}_image.nii.gz")
    _scan(mmwhs, f"{case}_label.nii.gz")
  written = predict.predict_paths(seg, mmwhs, tmp_path / "out", "ct")
  assert sorted(os.path.basename(p) for p in written) == [
    "ct_train_1001.json",
    "ct_train_1001.nii.gz",
    "ct_train_1002.json",
    "ct_train_1002.nii.gz",
  ]
  assert f"{mmwhs}: skipped 2 label file(s) (*_label.nii.gz); predicting the images only" in (
    capsys.readouterr().out
  )

  nnunet = tmp_path / "Dataset001"
  _scan(nnunet / "imagesTr", "a_0000.nii.gz")
  _scan(nnunet / "labelsTr", "a.nii.gz")
  _scan(nnunet / "imagesTs", "b_0000.nii.gz")
  found = predict_inputs.find_inputs(nnunet)
  assert [c.name for c in found.cases] == ["a", "b"]
  assert (found.skipped_labels, found.label_kind) == (1, "labelsTr/labelsTs/")

  chaos = tmp_path / "CHAOS" / "1" / "T2SPIR"
  _series(_scan(tmp_path), chaos / "DICOM_anon", modality="MR")
  (chaos / "Ground").mkdir()
  for k in range(SHAPE[2]):
    (chaos / "Ground" / f"liver_{k}.png").write_bytes(b"mask")
  found = predict_inputs.find_inputs(tmp_path / "CHAOS" / "1")
  assert [(c.name, c.series.modality) for c in found.cases] == [("1", "MR")]
  assert (found.skipped_labels, found.label_kind) == (5, "Ground/*.png")


def test_seg_of_a_series_and_of_a_nifti_on_its_grid_hold_the_nifti_prediction(seg, tmp_path):
  hd = pytest.importorskip("highdicom")

  nifti = _scan(tmp_path)
  folder = _series(nifti, tmp_path / "ct", shuffle_names=True)
  out = tmp_path / "out"
  written = predict.predict_paths(seg, folder, out, output_format="nifti,dicom_seg")
  assert written == [str(out / n) for n in ("ct.nii.gz", "ct.dcm", "ct.json")]
  predict.predict_paths(
    seg, nifti, tmp_path / "ref", "ct", output_format="dicom_seg", dicom_reference=folder
  )
  assert sorted(os.listdir(tmp_path / "ref")) == ["scan.dcm", "scan.json"]

  image = dicom_series.read_series(dicom_series.find_series(folder)[0])
  on_disk = np.vectorize(CODES.get)(_data(out / "ct.nii.gz"))
  expected = volumes.from_array(on_disk, AFFINE).array
  for path in (out / "ct.dcm", tmp_path / "ref" / "scan.dcm"):
    segmentation = hd.seg.segread(path)
    assert list(segmentation.get_segment_numbers()) == [1, 2]  # MYO, AA: no background
    assert [segmentation.get_segment_description(n).segment_label for n in (1, 2)] == RECORD[
      "classes"
    ][1:]
    algorithm = segmentation.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "ukd" and str(STEP) in algorithm.AlgorithmParameters
    labels = dicom_seg.read_seg(path, image, RECORD["classes"])
    np.testing.assert_array_equal(labels, expected)


def test_seg_of_a_nifti_needs_a_reference_on_its_grid(seg, tmp_path):
  nifti = _scan(tmp_path)
  with pytest.raises(ConfigError) as caught:
    predict.predict_paths(seg, nifti, tmp_path / "out", "ct", output_format="dicom_seg")
  assert str(caught.value).startswith(
    "--output_format=dicom_seg of a NIfTI input needs --dicom_reference=DIR"
  )
  assert "\n" not in str(caught.value) and not os.path.exists(tmp_path / "out")
  with pytest.raises(ConfigError, match=r"^--output_format='png' must be nifti, dicom_seg or"):
    predict.predict_paths(seg, nifti, tmp_path / "out", "ct", output_format="png")

  dicom_write.write_series(np.zeros((16, 16, 4)), tmp_path / "other")  # 4 slices, not 5
  with pytest.raises(DataError, match=r"scan.nii.gz: not on the grid of the --dicom_reference"):
    predict.predict_paths(
      seg,
      nifti,
      tmp_path / "out",
      "ct",
      output_format="dicom_seg",
      dicom_reference=tmp_path / "other",
    )
  assert not os.path.exists(tmp_path / "out" / "scan.dcm")


def test_a_tree_with_a_bad_series_writes_the_good_ones_and_exits_3(state, tmp_path):
  """One command line run: a checkpoint whose config predates `infer.dicom_modalities`,
  modalities from the tags, SEG and NIfTI out."""
  config, train_state = state
  old = ml_collections.ConfigDict(config.to_dict())
  del old.infer["dicom_modalities"]
  workdir = str(tmp_path / "run")
  mgr = checkpoints.manager(workdir)
  checkpoints.save(mgr, STEP, train_state, old, dataset=RECORD)
  mgr.wait_until_finished()
  mgr.close()

  nifti, tree = _scan(tmp_path), tmp_path / "study"
  for number, modality in ((1, "CT"), (2, "CT"), (3, "MR")):
    _series(nifti, tree / f"s{number}", series_number=number, modality=modality)
  os.remove(tree / "s2" / "IM00003.dcm")
  out = tmp_path / "out"
  result = run_module(
    "ukd.main",
    "--mode=predict",
    f"--workdir={workdir}",
    f"--input={tree}",
    f"--output={out}",
    "--output_format=nifti,dicom_seg",
    "--device=cpu",
    check=False,
  )
  assert result.returncode == 3, result.stderr[-3000:]
  lines = [line for line in result.stderr.splitlines() if line.startswith("ukd: ")]
  assert lines == [
    f"ukd: failed: series study_2 in {tree}: 1 missing slice: a gap of 5 mm after s2/IM00002.dcm "
    "where slices are 2.5 mm apart",
    f"ukd: error: {tree}: 1 of 3 cases failed (study_2; each named above); the other 2 were "
    f"written to {out}",
  ]
  assert sorted(os.listdir(out)) == [
    f"study_{n}{end}" for n in (1, 3) for end in (".dcm", ".json", ".nii.gz")
  ]
  assert [_json(out / f"study_{n}.json")["modality"] for n in (1, 3)] == ["ct", "mr"]
  shown = [line.split(" (")[0] for line in result.stdout.splitlines() if line.startswith("[")]
  assert shown == [  # plain lines, stdout being a pipe; case 2 failed on stderr
    f"[{n}/3] series study_{n} in {tree} -> {out / f'study_{n}.nii.gz'}" for n in (1, 3)
  ]


def _study(tmp_path, modalities=("CT", "CT", "CT")):
  """A folder of series 1, 2, ... of one scan, with the given Modality tags."""
  nifti, tree = _scan(tmp_path), tmp_path / "study"
  for number, modality in enumerate(modalities, start=1):
    _series(nifti, tree / f"s{number}", series_number=number, modality=modality)
  return tree


def test_a_failing_seg_writer_fails_its_series_only_and_leaves_nothing_of_it(
  seg, tmp_path, monkeypatch, capsys
):
  """highdicom raising (as it does on some real sources) after the prediction is that case's
  failure line; the partial SEG it left is removed and the next series is still predicted."""
  tree, out = _study(tmp_path), tmp_path / "out"
  write_seg = dicom_seg.write_seg

  def fail_on_the_second(labels, image, out_path, *args, **kwargs):
    if image.source.startswith("series study_2 "):
      with open(out_path, "wb") as f:
        f.write(b"half a SEG")
      raise ValueError("Source images have no Frame Of Reference UID")
    return write_seg(labels, image, out_path, *args, **kwargs)

  monkeypatch.setattr(dicom_seg, "write_seg", fail_on_the_second)
  with pytest.raises(predict.SomeFailed) as caught:
    predict.predict_paths(seg, tree, out, output_format="nifti,dicom_seg")
  assert str(caught.value) == (
    f"{tree}: 1 of 3 cases failed (study_2; each named above); the other 2 were written to {out}"
  )
  assert caught.value.exit_code == 3
  assert f"ukd: failed: series study_2 in {tree}: writing failed (ValueError: Source images " in (
    capsys.readouterr().err
  )
  assert sorted(os.listdir(out)) == [
    f"study_{n}{end}" for n in (1, 3) for end in (".dcm", ".json", ".nii.gz")
  ]


def _edit(path, change):
  import pydicom

  ds = pydicom.dcmread(path)
  change(ds)
  ds.save_as(path)


def test_a_series_no_seg_can_be_made_of_gets_its_nifti_and_a_line_why(seg, tmp_path, capsys):
  tree, out = _study(tmp_path, ("CT", "CT")), tmp_path / "out"
  for path in dicom_series.find_series(tree / "s2")[0].files:
    _edit(path, lambda ds: delattr(ds, "FrameOfReferenceUID"))
  written = predict.predict_paths(seg, tree, out, output_format="nifti,dicom_seg")
  assert sorted(os.path.basename(p) for p in written) == sorted(
    ["study_1.nii.gz", "study_1.dcm", "study_1.json", "study_2.nii.gz", "study_2.json"]
  )
  assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in written)
  reason = "the source images have no FrameOfReferenceUID, which a SEG of them needs"
  assert f"series study_2 in {tree}: no DICOM-SEG written: {reason}\n" in capsys.readouterr().out

  with pytest.raises(predict.SomeFailed, match=r"the other 1 was written"):
    predict.predict_paths(seg, tree, tmp_path / "seg_only", output_format="dicom_seg")
  assert (
    f"ukd: failed: series study_2 in {tree}: no DICOM-SEG can be written: {reason}; add nifti "
    "to --output_format for the labels\n"
  ) in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path / "seg_only")) == ["study_1.dcm", "study_1.json"]


def test_the_header_decides_the_modality_unless_told_otherwise(seg, tmp_path, capsys):
  tree, out = _study(tmp_path, ("CT", "MR")), tmp_path / "out"
  with pytest.raises(predict.SomeFailed) as caught:
    predict.predict_paths(seg, tree, out, "ct")
  assert str(caught.value).endswith("the other 1 was written to " + str(out))
  assert (
    f"ukd: failed: series study_2 in {tree}: --modality=ct contradicts its DICOM Modality 'MR' "
    "(mr); pass --modality_overrides_header to predict it as ct anyway\n"
  ) in capsys.readouterr().err
  assert sorted(os.listdir(out)) == ["study_1.json", "study_1.nii.gz"]

  predict.predict_paths(seg, tree, out, "ct", overwrite=True, modality_overrides_header=True)
  assert [_json(out / f"study_{n}.json")["modality"] for n in (1, 2)] == ["ct", "ct"]


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_a_mosaic_is_predicted_as_its_volume_and_a_single_file_is_an_input(seg, tmp_path, capsys):
  """nibabel's Siemens DWI MOSAIC (48 slices of 128 x 128 in one image) and pydicom's
  CT_small.dcm given as the input itself."""
  import gzip

  import nibabel

  data = os.path.join(os.path.dirname(nibabel.__file__), "nicom", "tests", "data")
  (tmp_path / "dwi").mkdir()
  with gzip.open(os.path.join(data, "siemens_dwi_1000.dcm.gz")) as f:
    (tmp_path / "dwi" / "b1000").write_bytes(f.read())
  out = tmp_path / "out"
  predict.predict_paths(seg, tmp_path / "dwi", out, output_format="nifti,dicom_seg")
  image = nib.load(out / "dwi.nii.gz")
  assert image.shape == (128, 128, 48)
  assert nib.affines.voxel_sizes(image.affine) == pytest.approx((1.796875, 1.796875, 3.0))
  assert _json(out / "dwi.json")["modality"] == "mr"
  assert "no DICOM-SEG written: a SEG frame cannot point at one slice of a Siemens MOSAIC" in (
    capsys.readouterr().out
  )
  assert not os.path.exists(out / "dwi.dcm")

  ct = os.path.join(os.path.dirname(__import__("pydicom").data.__file__), "test_files")
  written = predict.predict_paths(seg, os.path.join(ct, "CT_small.dcm"), tmp_path / "one")
  assert [os.path.basename(p) for p in written] == ["CT_small.nii.gz", "CT_small.json"]
  assert nib.load(tmp_path / "one" / "CT_small.nii.gz").shape == (128, 128, 1)


def test_the_python_api_needs_an_affine_where_the_model_resamples_and_matches_the_cli(
  state, tmp_path
):
  """A model trained at a set pixel size (`data.spacing`): an array alone would be taken as
  1 mm voxels; with its affine `Segmenter.predict` gives the command line's labels."""
  _, train_state = state
  config = infer_config()
  config.data.spacing = "1.5"
  segmenter = infer.Segmenter(config, variables_of(train_state))
  nifti = _scan(tmp_path)
  array = _data(nifti)
  with pytest.raises(DataError) as caught:
    segmenter.predict(array, "ct")
  assert str(caught.value) == (
    "predict: this model resamples to 1.5 mm pixels, so it needs the array's voxel size: pass "
    "affine= (e.g. nibabel's image.affine) or spacing= (mm)"
  )
  predict.predict_paths(segmenter, nifti, tmp_path / "out", "ct", label_codes="index")
  expected = _data(tmp_path / "out" / "scan.nii.gz")
  assert len(np.unique(expected)) > 1
  np.testing.assert_array_equal(segmenter.predict(array, "ct", affine=AFFINE), expected)
