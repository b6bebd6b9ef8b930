"""DICOM series and PNG masks (CHAOS T2-SPIR) through ukd.data.dicom and the abdominal adapter."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from ukd.data import adapters, dicom
from ukd.data.adapters import Case
from ukd.errors import DataError


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
  with pytest.raises(DataError, match=r"pip install 'ukd\[dicom\]'"):
    dicom.read_dicom_series(os.path.join(series, "DICOM_anon"))
