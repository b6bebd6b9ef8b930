"""DICOM series and PNG masks (CHAOS T2-SPIR) through ukd.data.io.dicom and the abdominal adapter."""

import os
import sys

import numpy as np
import pytest
from helpers import OBLIQUE_AFFINE
from PIL import Image

from ukd.data import adapters
from ukd.data.adapters import Case
from ukd.data.io import dicom
from ukd.errors import DataError, MissingExtra


def _write_dicom(path, pixels, position, orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.6)):
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ImplicitVRLittleEndian, generate_uid

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ImplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.Modality = "MR"
  ds.Rows, ds.Columns = pixels.shape
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
  ds.PixelSpacing = list(spacing)
  ds.ImageOrientationPatient = list(orientation)
  ds.ImagePositionPatient = list(position)
  ds.SliceThickness = 3.0
  ds.PixelData = pixels.astype(np.uint16).tobytes()
  ds.save_as(path, enforce_file_format=True)


# File k (1-based) lies at z = Z_OF_FILE[k]: file names do NOT follow anatomy.
Z_OF_FILE = {1: 16.0, 2: 10.0, 3: 13.0}


def _chaos_dicom(root, patient="2"):
  series = os.path.join(root, "CHAOS", "Train_Sets", "MR", patient, "T2SPIR")
  os.makedirs(os.path.join(series, "DICOM_anon"))
  os.makedirs(os.path.join(series, "Ground"))
  pixels, masks = {}, {}
  for k, z in Z_OF_FILE.items():
    rows, cols = np.mgrid[0:3, 0:4]
    pixels[k] = 100 * k + 10 * rows + cols  # pixel (r, c) of file k
    masks[k] = np.zeros((3, 4), np.uint8)
    stem = f"IMG-0004-{k:05d}"
    _write_dicom(os.path.join(series, "DICOM_anon", stem + ".dcm"), pixels[k], (-5.0, 7.0, z))
  masks[2][2, 3] = 126  # right kidney at the canonical origin voxel (see below)
  masks[1][0, 0] = 63
  masks[3][1, 2] = 252
  masks[3][0, 1] = 185
  for k, mask in masks.items():
    Image.fromarray(mask).save(os.path.join(series, "Ground", f"IMG-0004-{k:05d}.png"))
  return pixels, masks, series


def test_chaos_dicom_geometry_and_codes(tmp_path):
  pytest.importorskip("pydicom")
  pixels, masks, series = _chaos_dicom(tmp_path)
  adapter = adapters.get_adapter("abdominal", modalities=("mr",))
  (case,) = adapter.cases(str(tmp_path))
  dicom_dir, ground = os.path.join(series, "DICOM_anon"), os.path.join(series, "Ground")
  assert case == Case("chaos_2", "mr", dicom_dir, ground)
  image, label = adapter.read(case)

  # DICOM rows run along +x (patient left), columns along +y (posterior): in RAS both are
  # negated. Voxel axes on disk are (column, row, slice); slices sorted by z: files 2, 3, 1.
  expected_affine = np.array(
    [[-0.6, 0, 0, 5.0], [0, -0.8, 0, -7.0], [0, 0, 3.0, 10.0], [0, 0, 0, 1]]
  )
  np.testing.assert_allclose(image.affine, expected_affine, atol=1e-9)
  assert image.spacing == pytest.approx((0.6, 0.8, 3.0))
  assert image.array.shape == (4, 3, 3) and image.original_shape == (4, 3, 3)
  # Canonical flips x and y: canonical[i, j, k] = pixels[file of slice k][2 - j, 3 - i].
  assert image.array[0, 0, 0] == 223  # file 2, row 2, column 3
  assert image.array[3, 2, 2] == 100  # file 1 (z=16), row 0, column 0
  expected = np.stack([pixels[k][::-1, ::-1].T for k in (2, 3, 1)], axis=-1)
  np.testing.assert_array_equal(image.array, expected)

  assert label.array[0, 0, 0] == 2  # 126 -> right kidney
  assert label.array[3, 2, 2] == 1  # 63 -> liver
  assert label.array[1, 1, 1] == 4  # file 3 (z=13) row 1 column 2: 252 -> spleen
  assert label.array[2, 2, 1] == 3  # file 3 row 0 column 1: 185 -> left kidney
  assert int(label.array.sum()) == 2 + 1 + 4 + 3
  np.testing.assert_array_equal(label.affine, image.affine)


def test_chaos_dicom_world_position_of_a_voxel(tmp_path):
  """Independent check: canonical voxel (0, 0, 0) is DICOM file 2, row 2, column 3."""
  pytest.importorskip("pydicom")
  _chaos_dicom(tmp_path)
  (case,) = adapters.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))
  image, _ = adapters.get_adapter("abdominal").read(case)
  on_disk = np.array([3, 2, 0, 1])  # (column, row, sorted slice)
  lps = np.array([-5.0 + 3 * 0.6, 7.0 + 2 * 0.8, 10.0])  # position + c*dc*x + r*dr*y
  np.testing.assert_allclose(image.affine @ on_disk, [-lps[0], -lps[1], lps[2], 1.0])


def test_chaos_mask_count_mismatch(tmp_path):
  pytest.importorskip("pydicom")
  _, _, series = _chaos_dicom(tmp_path)
  os.remove(os.path.join(series, "Ground", "IMG-0004-00003.png"))
  (case,) = adapters.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))
  with pytest.raises(DataError, match="Ground: 2 PNG masks for 3 DICOM slices"):
    adapters.get_adapter("abdominal").read(case)


def test_chaos_patient_without_masks(tmp_path):
  pytest.importorskip("pydicom")
  _, _, series = _chaos_dicom(tmp_path)
  for name in os.listdir(os.path.join(series, "Ground")):
    os.remove(os.path.join(series, "Ground", name))
  with pytest.raises(DataError, match="Ground: image has no label"):
    adapters.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))


def test_corrupt_dicom_slice(tmp_path):
  pytest.importorskip("pydicom")
  _, _, series = _chaos_dicom(tmp_path)
  bad = os.path.join(series, "DICOM_anon", "IMG-0004-00002.dcm")
  with open(bad, "wb") as f:
    f.write(b"garbage")
  (case,) = adapters.get_adapter("abdominal", modalities=("mr",)).cases(str(tmp_path))
  with pytest.raises(DataError, match="IMG-0004-00002.dcm: cannot read DICOM"):
    adapters.get_adapter("abdominal").read(case)


def test_missing_pydicom_gives_install_hint(tmp_path, monkeypatch):
  pytest.importorskip("pydicom")
  _, _, series = _chaos_dicom(tmp_path)
  monkeypatch.setitem(sys.modules, "pydicom", None)
  with pytest.raises(
    MissingExtra, match=r"^DICOM input needs the .dicom. extra: pip install .ukd\[dicom\].$"
  ):
    dicom.read_dicom_series(os.path.join(series, "DICOM_anon"))


# ---- DICOM series in any layout (ukd.data.io.dicom_series / dicom_write / dicom_seg) ----

SHAPE = (24, 20, 6)  # columns, rows, slices on disk
AFFINE = OBLIQUE_AFFINE


def _nifti(tmp_path, affine=AFFINE, name="ct.nii.gz"):
  """A float HU-like phantom saved as NIfTI and read back as ukd reads NIfTI inputs."""
  import nibabel as nib

  from ukd.data.io import volumes

  i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
  array = (-1000 + 13.37 * i + 7.1 * j + 100.25 * k + 0.3 * np.sin(i * j)).astype(np.float32)
  nib.save(nib.Nifti1Image(array, affine), tmp_path / name)
  return volumes.read_image(tmp_path / name)


def _read_only_series(folder):
  from ukd.data.io import dicom_series

  (series,) = dicom_series.find_series(folder)
  return dicom_series.read_series(series)


def _edit(path, change):
  import pydicom

  ds = pydicom.dcmread(path)
  change(ds)
  ds.save_as(path)


def test_series_reads_back_like_its_nifti(tmp_path):
  pytest.importorskip("pydicom")
  from ukd.data.io import dicom_series
  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  written = dicom_write.write_series(nifti, tmp_path / "ct", modality="CT")
  assert [os.path.basename(p) for p in written] == [f"IM{k:05d}.dcm" for k in range(1, 7)]
  (series,) = dicom_series.find_series(tmp_path / "ct")
  assert (series.name, series.modality, series.number, len(series.files)) == ("ct", "CT", 1, 6)
  image = dicom_series.read_series(series)

  # Float HU are spread over int16: slope = range / 65534, so they come back within slope/2.
  low, high = float(nifti.array.min()), float(nifti.array.max())
  slope = float(image.headers[0].RescaleSlope)
  assert slope == pytest.approx((high - low) / 65534, rel=1e-6)
  assert (
    image.headers[0].RescaleType == "HU" and image.headers[0].SOPClassUID.name == "CT Image Storage"
  )
  np.testing.assert_allclose(image.volume.array, nifti.array, rtol=0, atol=0.5 * slope + 1e-4)
  assert np.abs(image.volume.array - nifti.array).max() > 0  # it was rescaled
  np.testing.assert_allclose(image.volume.affine, nifti.affine, atol=1e-4)
  assert image.volume.spacing == pytest.approx(nifti.spacing)
  # The first slice sits at the NIfTI origin, in LPS: x and y negated.
  first = image.headers[image.frames[0][0]]
  np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], [12.0, -5.0, 30.0])
  assert image.skipped == [] and [n for _, n in image.frames] == [1] * 6


def test_whole_hu_values_are_stored_as_they_are(tmp_path):
  pytest.importorskip("pydicom")
  from ukd.data.synthetic import dicom_write

  array = np.round(_nifti(tmp_path).array)
  dicom_write.write_series(array, tmp_path / "ct", affine=np.diag([0.8, 0.7, 2.5, 1.0]))
  image = _read_only_series(tmp_path / "ct")
  assert (image.headers[0].RescaleSlope, image.headers[0].RescaleIntercept) == (1, 0)
  np.testing.assert_array_equal(image.volume.array, array)  # the identity affine is canonical


def test_a_negative_determinant_comes_back_with_the_slice_axis_reversed(tmp_path):
  pytest.importorskip("pydicom")
  from ukd.data.synthetic import dicom_write

  radiological = np.diag([-0.8, 0.7, 2.5, 1.0])
  nifti = _nifti(tmp_path, radiological)
  dicom_write.write_series(nifti, tmp_path / "mr", modality="MR")
  image = _read_only_series(tmp_path / "mr")
  slope = float(image.headers[0].RescaleSlope)
  np.testing.assert_allclose(image.volume.array, nifti.array, rtol=0, atol=0.5 * slope + 1e-4)
  np.testing.assert_allclose(image.volume.affine[:3, 2], [0, 0, -2.5], atol=1e-6)
  np.testing.assert_allclose(image.volume.affine[:3, 3], [0, 0, 5 * 2.5], atol=1e-4)


def test_shuffled_nameless_files_read_the_same(tmp_path):
  pytest.importorskip("pydicom")
  import pydicom

  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  dicom_write.write_series(nifti, tmp_path / "numbered")
  shuffled = dicom_write.write_series(nifti, tmp_path / "nameless", shuffle_names=True, seed=3)
  assert all("." not in os.path.basename(p) for p in shuffled)
  in_listing_order = [pydicom.dcmread(p).InstanceNumber for p in sorted(shuffled)]
  assert in_listing_order != sorted(in_listing_order)
  numbered, nameless = (_read_only_series(tmp_path / d) for d in ("numbered", "nameless"))
  np.testing.assert_array_equal(nameless.volume.array, numbered.volume.array)
  np.testing.assert_allclose(nameless.volume.affine, numbered.volume.affine, atol=1e-9)


def _export_tree(tmp_path):
  """export/a: CT series 3; export/b: CT series 5 and, below it, export/b/c: MR series 5
  (shuffled names), plus a text file: one study, three series."""
  from pydicom.uid import generate_uid

  from ukd.data.synthetic import dicom_write

  nifti, root, study = _nifti(tmp_path), tmp_path / "export", generate_uid()
  dicom_write.write_series(nifti, root / "a", series_number=3, study_uid=study)
  dicom_write.write_series(nifti, root / "b", series_number=5, study_uid=study)
  dicom_write.write_series(
    nifti, root / "b" / "c", modality="MR", series_number=5, study_uid=study, shuffle_names=True
  )
  (root / "b" / "notes.txt").write_text("not DICOM")
  return root, study


def _check_export(found, study):
  from ukd.data.io import dicom_series

  assert [s.name for s in found] == ["export_3", "export_5", "export_5_2"]
  assert [s.number for s in found] == [3, 5, 5]
  assert sorted(s.modality for s in found) == ["CT", "CT", "MR"]
  assert {s.study_uid for s in found} == {study} and len({s.series_uid for s in found}) == 3
  assert [len(s.files) for s in found] == [6, 6, 6]
  for series in found:
    assert dicom_series.read_series(series).volume.array.shape == SHAPE


def test_several_series_in_a_tree_are_found_apart(tmp_path):
  pytest.importorskip("pydicom")
  from ukd.data.io import dicom_series

  root, study = _export_tree(tmp_path)
  _check_export(dicom_series.find_series(root), study)
  (alone,) = dicom_series.find_series(root / "a")
  assert alone.name == "a"
  with pytest.raises(DataError, match=r"notes.txt: not a DICOM file, a folder or a .zip file"):
    dicom_series.find_series(root / "b" / "notes.txt")


def test_a_zip_of_a_tree_is_found_like_the_tree(tmp_path):
  pytest.importorskip("pydicom")
  import zipfile

  from ukd.data.io import dicom_series

  root, study = _export_tree(tmp_path)
  with zipfile.ZipFile(tmp_path / "export.zip", "w") as archive:
    for folder, _, names in os.walk(root):
      for name in names:
        path = os.path.join(folder, name)
        archive.write(path, os.path.relpath(path, root))
  found = dicom_series.find_series(tmp_path / "export.zip", extract_to=str(tmp_path / "unzipped"))
  assert all(s.root == str(tmp_path / "export.zip") for s in found)
  _check_export(found, study)
  (tmp_path / "broken.zip").write_bytes(b"PK not really")
  with pytest.raises(DataError, match="broken.zip: cannot unpack zip"):
    dicom_series.find_series(tmp_path / "broken.zip")


def test_an_enhanced_multiframe_file_reads_like_single_frames(tmp_path):
  pytest.importorskip("highdicom")
  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  dicom_write.write_series(nifti, tmp_path / "single")
  (path,) = dicom_write.write_series(nifti, tmp_path / "multi", multiframe=True)
  single, multi = (_read_only_series(tmp_path / d) for d in ("single", "multi"))
  assert (
    int(multi.headers[0].NumberOfFrames) == 6
    and "PerFrameFunctionalGroupsSequence" in (multi.headers[0])
  )
  assert "PixelData" not in multi.headers[0]  # headers only
  assert sorted(n for _, n in multi.frames) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal(multi.volume.array, single.volume.array)
  np.testing.assert_allclose(multi.volume.affine, single.volume.affine, atol=1e-6)


def _tilt(ds):
  """Shift slice k by k mm along the row direction: a 5 mm drift over 12.5 mm, 21.8 deg."""
  k = int(ds.InstanceNumber) - 1
  row_dir = np.array([float(v) for v in ds.ImageOrientationPatient[:3]])
  ds.ImagePositionPatient = [float(v) + k * d for v, d in zip(ds.ImagePositionPatient, row_dir)]


def _shrink(ds):
  ds.Rows, ds.Columns = 10, 12
  ds.PixelData = np.zeros((10, 12), np.int16).tobytes()


BAD_SERIES = {
  "gap": (
    lambda folder: os.remove(folder / "IM00003.dcm"),
    r"1 missing slice: a gap of 5 mm after IM00002.dcm where slices are 2.5 mm apart$",
  ),
  "mixed size": (
    lambda folder: _edit(folder / "IM00004.dcm", _shrink),
    r"slices of different size or pixel spacing mixed: 20x24 at 0.7x0.8 mm \(5\), "
    r"10x12 at 0.7x0.8 mm \(1\)$",
  ),
  "mixed orientation": (
    lambda folder: [
      _edit(
        folder / f"IM{k:05d}.dcm",
        lambda ds: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]),
      )
      for k in (4, 5, 6)
    ],
    r"slices in 2 orientations mixed: 3 along \[.*\], 3 along \[0.0, 1.0, 0.0, 0.0, 0.0, -1.0\]$",
  ),
  "tilt": (
    lambda folder: [_edit(folder / f"IM{k:05d}.dcm", _tilt) for k in range(1, 7)],
    r"gantry tilt: slice positions drift 5 mm in-plane \(22 degrees off the slice normal\)",
  ),
  "no pixel data": (
    lambda folder: _edit(folder / "IM00002.dcm", lambda ds: delattr(ds, "PixelData")),
    r"IM00002.dcm: no pixel data \(not an image\)$",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD_SERIES))
def test_a_bad_series_gives_one_line_naming_it(tmp_path, case):
  pytest.importorskip("pydicom")
  from ukd.data.synthetic import dicom_write

  folder = tmp_path / "ct"
  dicom_write.write_series(_nifti(tmp_path), folder)
  spoil, message = BAD_SERIES[case]
  spoil(folder)
  with pytest.raises(DataError, match=rf"^series ct in {folder}: {message}") as caught:
    _read_only_series(folder)
  assert "\n" not in str(caught.value)


def test_a_bad_series_does_not_stop_the_good_ones(tmp_path):
  pytest.importorskip("pydicom")
  from ukd.data.io import dicom_series
  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  dicom_write.write_series(nifti, tmp_path / "in" / "good", series_number=1)
  dicom_write.write_series(nifti, tmp_path / "in" / "bad", series_number=2)
  os.remove(tmp_path / "in" / "bad" / "IM00003.dcm")
  (tmp_path / "in" / "broken").write_bytes(b"\0" * 128 + b"DICM")  # a marker, no header
  read, failed = [], []
  for series in dicom_series.find_series(tmp_path / "in"):
    try:
      read.append((series.name, dicom_series.read_series(series).volume.array.shape))
    except DataError as e:
      failed.append(str(e))
  assert read == [("in_1", SHAPE)]
  assert len(failed) == 2
  assert failed[0].startswith(f"series in_2 in {tmp_path / 'in'}: 1 missing slice")
  assert failed[1] == f"series broken in {tmp_path / 'in'}: no SeriesInstanceUID"


def test_localizers_are_skipped_and_reported(tmp_path):
  pytest.importorskip("pydicom")
  import pydicom
  from pydicom.uid import generate_uid

  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  folder = tmp_path / "ct"
  dicom_write.write_series(nifti, folder)
  clean = _read_only_series(folder)
  scout = pydicom.dcmread(folder / "IM00001.dcm")
  scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  scout.save_as(folder / "scout")
  lone = pydicom.dcmread(folder / "IM00002.dcm")  # typed AXIAL, but alone in its orientation
  lone.SOPInstanceUID = lone.file_meta.MediaStorageSOPInstanceUID = generate_uid()
  lone.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
  _shrink(lone)
  lone.save_as(folder / "lone")

  image = _read_only_series(folder)
  assert image.skipped == [
    f"series ct in {folder}: skipped localizer scout (ImageType LOCALIZER)",
    f"series ct in {folder}: skipped localizer lone (a lone slice in another orientation)",
  ]
  np.testing.assert_array_equal(image.volume.array, clean.volume.array)
  assert len(image.headers) == 6 and all("scout" not in p and "lone" not in p for p in image.paths)


def test_a_compressed_series_is_decoded(tmp_path):
  pytest.importorskip("pydicom")
  from pydicom.uid import RLELossless

  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  dicom_write.write_series(nifti, tmp_path / "plain")
  for path in dicom_write.write_series(nifti, tmp_path / "rle"):
    _edit(path, lambda ds: ds.compress(RLELossless))  # pydicom's own RLE codec
  plain, rle = (_read_only_series(tmp_path / d) for d in ("plain", "rle"))
  assert rle.headers[0].file_meta.TransferSyntaxUID == RLELossless
  np.testing.assert_array_equal(rle.volume.array, plain.volume.array)


def test_an_undecodable_transfer_syntax_names_it_and_the_package(tmp_path):
  pytest.importorskip("pydicom")
  from pydicom.encaps import encapsulate
  from pydicom.pixels import get_decoder
  from pydicom.uid import JPEGLosslessSV1

  from ukd.data.synthetic import dicom_write

  if get_decoder(JPEGLosslessSV1).is_available:
    pytest.skip("a JPEG Lossless decoder (pylibjpeg-libjpeg or gdcm) is installed")

  def fake_jpeg(ds):  # uncompressed bytes in a JPEG Lossless wrapper
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.PixelData = encapsulate([ds.PixelData])

  folder = tmp_path / "ct"
  dicom_write.write_series(_nifti(tmp_path), folder)
  _edit(folder / "IM00004.dcm", fake_jpeg)
  with pytest.raises(DataError) as caught:
    _read_only_series(folder)
  assert str(caught.value) == (
    f"series ct in {folder}: IM00004.dcm: pixel data compressed as JPEG Lossless, "
    "Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1]) "
    "(1.2.840.10008.1.2.4.70) and no installed decoder reads it: "
    "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
  )


def test_modality_table(tmp_path):
  from ukd.data.io.dicom_series import map_modality

  assert map_modality("CT", ("ct", "mr")) == "ct"
  assert map_modality("MR", ("ct", "mr")) == "mr"
  assert map_modality("MR", ("t1",), table={"MR": "t1"}) == "t1"
  with pytest.raises(DataError, match=r"^scan: DICOM Modality 'PT' is not a modality the model"):
    map_modality("PT", ("ct", "mr"), source="scan")
  with pytest.raises(DataError, match=r"'MR' \(mapped to 'mr'\) .* trained on \(ct\); the "):
    map_modality("MR", ("ct",))


# Class masks on the NIfTI's own grid: liver (1) and left kidney (3) boxes; right kidney (2)
# and spleen (4) absent, yet described.
ABDOMEN = ("background", "liver", "right_kidney", "left_kidney", "spleen")


def _labels():
  labels = np.zeros(SHAPE, np.int32)
  labels[2:9, 3:10, 1:4] = 1
  labels[12:20, 5:9, 2:6] = 3
  return labels


def test_seg_references_its_series_and_codes_each_class(tmp_path):
  hd = pytest.importorskip("highdicom")
  import pydicom

  from ukd.data.io import dicom_seg, volumes
  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  dicom_write.write_series(nifti, tmp_path / "ct", shuffle_names=True)
  image = _read_only_series(tmp_path / "ct")
  canonical = volumes.from_array(_labels(), nifti.affine).array
  out = tmp_path / "seg.dcm"
  codes = dicom_seg.SEG_CODES["abdominal"]
  dicom_seg.write_seg(canonical, image, out, ABDOMEN, codes, algorithm_version="0.1.0", step=1500)

  seg = hd.seg.segread(out)
  assert seg.SegmentationType == "BINARY"
  assert seg.FrameOfReferenceUID == image.headers[0].FrameOfReferenceUID
  assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image.headers[0].SeriesInstanceUID
  numbers = list(seg.get_segment_numbers())
  assert numbers == [1, 2, 3, 4]
  described = [seg.get_segment_description(n) for n in numbers]
  assert [d.segment_label for d in described] == list(ABDOMEN[1:])
  assert [
    (d.segmented_property_type.value, d.segmented_property_type.scheme_designator)
    for d in described
  ] == [
    ("10200004", "SCT"),  # liver
    ("9846003", "SCT"),  # right kidney
    ("18639004", "SCT"),  # left kidney
    ("78961009", "SCT"),  # spleen
  ]
  assert {d.segmented_property_category.value for d in described} == {"91723000"}
  algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
  assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ukd", "0.1.0")
  assert "1500" in algorithm.AlgorithmParameters

  # Each source image's SEG frame is its slice of the label map: slice k sits k * 2.5 mm
  # along the normal from the first.
  labels = _labels()
  for path in image.paths:
    source = pydicom.dcmread(path)
    k = round((float(source.ImagePositionPatient[2]) - 30.0) / 2.5)
    frame = seg.get_pixels_by_source_instance(
      [source.SOPInstanceUID], combine_segments=True, assert_missing_frames_are_empty=True
    )[0]
    np.testing.assert_array_equal(frame, labels[:, :, k].T)
  np.testing.assert_array_equal(dicom_seg.read_seg(out, image, ABDOMEN), canonical)


def test_seg_of_a_multiframe_series_and_generic_tissue_codes(tmp_path):
  hd = pytest.importorskip("highdicom")
  from ukd.data.io import dicom_seg, volumes
  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  dicom_write.write_series(nifti, tmp_path / "mr", modality="MR", multiframe=True)
  image = _read_only_series(tmp_path / "mr")
  classes = ("background", "lesion", "edema", "cyst", "tumour")  # a folder dataset's own
  canonical = volumes.from_array(_labels(), nifti.affine).array
  dicom_seg.write_seg(canonical, image, tmp_path / "seg.dcm", classes)
  seg = hd.seg.segread(tmp_path / "seg.dcm")
  tissue = {
    (d.segmented_property_category.value, d.segmented_property_type.value)
    for d in (seg.get_segment_description(n) for n in seg.get_segment_numbers())
  }
  assert tissue == {("85756007", "85756007")}
  np.testing.assert_array_equal(dicom_seg.read_seg(tmp_path / "seg.dcm", image, classes), canonical)
  with pytest.raises(DataError, match=r"segment 1 'lesion' is not one of \['background', 'liver'"):
    dicom_seg.read_seg(tmp_path / "seg.dcm", image, ABDOMEN)


# ---- Real files (pydicom's and nibabel's own test data) and what scanners and CDs do --------


def _real(tmp_path, *paths):
  """A folder holding copies of the files (a .gz one unpacked), as a user would point at."""
  import gzip
  import shutil

  folder = tmp_path / "real"
  folder.mkdir(exist_ok=True)
  for path in paths:
    path = str(path)
    if path.endswith(".gz"):
      with gzip.open(path) as f:
        (folder / os.path.basename(path)[: -len(".gz")]).write_bytes(f.read())
    else:
      shutil.copy(path, folder)
  return folder


def _nibabel_data(name):
  nibabel = pytest.importorskip("nibabel")
  return os.path.join(os.path.dirname(nibabel.__file__), "nicom", "tests", "data", name)


def _pydicom_data(name):
  """A test file pydicom ships (never one it would download)."""
  pydicom = pytest.importorskip("pydicom")
  path = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", name)
  if not os.path.exists(path):
    pytest.skip(f"{name} is not shipped with this pydicom")
  return path


def test_a_single_slice_is_as_thick_as_its_slice_thickness_not_the_slice_spacing(tmp_path):
  """pydicom's JPEG 2000 CT: SliceThickness 5, SpacingBetweenSlices 20 (the gap between slices
  of the series it came from): one slice's voxels are 5 mm deep."""
  from pydicom.pixels import get_decoder
  from pydicom.uid import JPEG2000

  if not get_decoder(JPEG2000).is_available:
    pytest.skip("no JPEG 2000 decoder installed")
  image = _read_only_series(_real(tmp_path, _pydicom_data("693_J2KI.dcm")))
  assert image.volume.array.shape == (512, 512, 1)
  assert image.volume.spacing == pytest.approx((0.478516, 0.478516, 5.0))


def test_a_copy_of_an_instance_is_dropped_with_a_note_another_instance_there_is_an_error(
  tmp_path,
):
  import shutil

  pytest.importorskip("pydicom")
  from pydicom.uid import generate_uid

  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  folder = tmp_path / "ct"
  dicom_write.write_series(nifti, folder)
  clean = _read_only_series(folder)
  (folder / "copy").mkdir()
  shutil.copy(folder / "IM00003.dcm", folder / "copy" / "IM00003.dcm")  # as CDs hold them
  image = _read_only_series(folder)
  assert image.skipped == [f"series ct in {folder}: dropped 1 duplicate file (copy/IM00003.dcm)"]
  np.testing.assert_array_equal(image.volume.array, clean.volume.array)
  assert len(image.headers) == 6 and not any(p.endswith("copy/IM00003.dcm") for p in image.paths)

  _edit(
    folder / "copy" / "IM00003.dcm", lambda ds: setattr(ds, "PixelData", bytes(len(ds.PixelData)))
  )
  with pytest.raises(DataError, match=r"IM00003.dcm and copy/IM00003.dcm hold the same "):
    _read_only_series(folder)

  def another(ds):
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()

  _edit(folder / "copy" / "IM00003.dcm", another)  # another instance at the same position
  with pytest.raises(DataError) as caught:
    _read_only_series(folder)
  assert str(caught.value) == (
    f"series ct in {folder}: 1 slice repeats another's position (several acquisitions, "
    "echoes or phases in one series)"
  )


@pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")
def test_a_siemens_mosaic_is_cut_into_its_slices_on_nibabels_grid(tmp_path):
  """nibabel's Siemens DWI: 48 slices of 128 x 128 tiled 7 x 7 into 896 x 896 pixels. The
  volume and its affine are nibabel's own demosaiced ones (its axes are rows, columns)."""
  import pydicom
  from nibabel.nicom import dicomwrappers

  folder = _real(tmp_path, _nibabel_data("siemens_dwi_1000.dcm.gz"))
  image = _read_only_series(folder)
  assert image.volume.array.shape == (128, 128, 48)
  assert image.volume.spacing == pytest.approx((1.796875, 1.796875, 3.0))
  wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(folder / "siemens_dwi_1000.dcm"))
  expected = wrapper.get_data()
  on_disk = image.volume.to_original(image.volume.array)  # (column, row, slice)
  np.testing.assert_allclose(on_disk, expected.transpose(1, 0, 2), rtol=1e-6)
  nib_affine = dicom.LPS_TO_RAS @ wrapper.affine[:, [1, 0, 2, 3]]  # to (column, row, slice)
  np.testing.assert_allclose(image.volume.affine, nib_affine, atol=1e-4)


def test_a_mosaic_that_cannot_be_cut_is_refused_in_one_line(tmp_path):
  """nibabel's 0.dcm: a MOSAIC of 48 images shrunk to 256 x 256 pixels, which 7 x 7 tiles do
  not divide; without its CSA header no MOSAIC says how many slices it holds."""
  folder = _real(tmp_path, _nibabel_data("0.dcm"))
  with pytest.raises(DataError) as caught:
    _read_only_series(folder)
  assert str(caught.value) == (
    f"series real in {folder}: 0.dcm: Siemens MOSAIC of 48 images (CSA NumberOfImagesInMosaic) "
    "that do not tile its 256x256 pixels: cannot demosaic"
  )

  def no_csa(ds):
    del ds[0x00291010]

  _edit(folder / "0.dcm", no_csa)
  with pytest.raises(DataError, match=r"0.dcm: Siemens MOSAIC without NumberOfImagesInMosaic"):
    _read_only_series(folder)


def test_a_single_dicom_file_is_a_series(tmp_path):
  from ukd.data.io import dicom_series
  from ukd.serve import inputs as predict_inputs

  path = _real(tmp_path, _pydicom_data("CT_small.dcm")) / "CT_small.dcm"
  (series,) = dicom_series.find_series(path)
  assert (series.name, series.files, series.modality) == ("CT_small", (str(path),), "CT")
  assert dicom_series.read_series(series).volume.array.shape == (128, 128, 1)
  (case,) = predict_inputs.find_inputs(path).cases
  assert case.name == "CT_small"
  (tmp_path / "notes.txt").write_text("not DICOM")
  with pytest.raises(DataError, match=r"notes.txt: not a NIfTI file \(.nii, .nii.gz\), a DICOM"):
    predict_inputs.find_inputs(tmp_path / "notes.txt")


def test_seg_of_an_enhanced_image_with_pixel_measures_in_each_frames_groups(tmp_path):
  """Scanners may put PixelSpacing in every frame's functional groups rather than the shared
  ones (pydicom's emri_small.dcm does), where highdicom looks for it."""
  pytest.importorskip("highdicom")
  from ukd.data.io import dicom_seg, volumes
  from ukd.data.synthetic import dicom_write

  nifti = _nifti(tmp_path)
  (path,) = dicom_write.write_series(nifti, tmp_path / "mr", modality="MR", multiframe=True)

  def per_frame(ds):
    shared = ds.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence
    del shared.PixelMeasuresSequence
    for frame in ds.PerFrameFunctionalGroupsSequence:
      frame.PixelMeasuresSequence = measures

  _edit(path, per_frame)
  image = _read_only_series(tmp_path / "mr")
  assert "PixelMeasuresSequence" not in image.headers[0].SharedFunctionalGroupsSequence[0]
  canonical = volumes.from_array(_labels(), nifti.affine).array
  dicom_seg.write_seg(canonical, image, tmp_path / "seg.dcm", ABDOMEN)
  np.testing.assert_array_equal(dicom_seg.read_seg(tmp_path / "seg.dcm", image, ABDOMEN), canonical)
  assert "PixelMeasuresSequence" not in image.headers[0].SharedFunctionalGroupsSequence[0]


def test_no_seg_of_a_source_without_a_frame_of_reference(tmp_path):
  """pydicom's JPEG 2000 CT has no FrameOfReferenceUID, which a CT image must have and a SEG
  placed in its space needs: no SEG, one line why."""
  pytest.importorskip("highdicom")
  from pydicom.pixels import get_decoder
  from pydicom.uid import JPEG2000

  from ukd.data.io import dicom_seg

  if not get_decoder(JPEG2000).is_available:
    pytest.skip("no JPEG 2000 decoder installed")
  folder = _real(tmp_path, _pydicom_data("693_J2KI.dcm"))
  image = _read_only_series(folder)
  reason = "the source images have no FrameOfReferenceUID, which a SEG of them needs"
  assert dicom_seg.seg_problem(image) == reason
  with pytest.raises(DataError) as caught:
    dicom_seg.write_seg(np.zeros((512, 512, 1), np.uint8), image, tmp_path / "seg.dcm", ABDOMEN)
  assert str(caught.value) == f"series real in {folder}: no DICOM-SEG: {reason}"
  assert not os.path.exists(tmp_path / "seg.dcm")
