"""MR sequences as modalities of their own: CHAOS T1-DUAL in-phase, out-phase and T2-SPIR read
as separate modalities, DICOM series told apart by `config.infer.dicom_sequences`, and a
three-modality run (CT + two MR sequences) that trains, evaluates and predicts."""

import json
import os

import numpy as np
import pytest
from helpers import tiny_config

from ukd import commands
from ukd import config as config_lib
from ukd.data import adapters
from ukd.data.io import dicom_series
from ukd.data.synthetic import generate
from ukd.errors import ConfigError, DataError
from ukd.serve import predict, segmenter

pytest.importorskip("pydicom")

SHAPE = (16, 16, 8)
SEQUENCES = {"t1in": "T1DUAL/InPhase", "t1out": "T1DUAL/OutPhase", "t2": "T2SPIR"}
PATTERNS = {"t1in": r"in[ _-]?phase", "t2": r"t2"}


@pytest.fixture(scope="module")
def chaos_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("abdominal")
  generate.write_abdominal(root, 1, 2, shape=SHAPE, t1dual=True)
  return str(root)


# ------------------------------------------------------------------ CHAOS sequences read


def test_the_phantoms_write_both_t1dual_phases_with_one_set_of_masks(chaos_root):
  patient = os.path.join(chaos_root, "CHAOS", "Train_Sets", "MR", "1", "T1DUAL")
  listed = {
    part: sorted(os.listdir(os.path.join(patient, *part.split("/"))))
    for part in ("DICOM_anon/InPhase", "DICOM_anon/OutPhase", "Ground")
  }
  slices = range(SHAPE[2])
  assert listed["DICOM_anon/InPhase"] == [f"IMG-0004-{2 * k + 2:05d}.dcm" for k in slices]
  assert listed["DICOM_anon/OutPhase"] == [f"IMG-0004-{2 * k + 1:05d}.dcm" for k in slices]
  assert listed["Ground"] == [f"IMG-0004-{2 * k + 2:05d}.png" for k in slices]


def test_each_sequence_is_a_modality_with_the_shared_masks_on_its_slices(chaos_root):
  adapter = adapters.get_adapter("abdominal", mr_sequences=SEQUENCES)
  assert adapter.modalities == ("ct", "t1in", "t1out", "t2")
  cases = adapter.cases(chaos_root)
  by = {(c.modality, c.id): c for c in cases}
  assert sorted(by) == sorted(
    [("ct", "btcv_0001")] + [(m, f"chaos_{p}") for m in SEQUENCES for p in (1, 2)]
  )
  assert by["t1out", "chaos_1"].image.endswith(os.path.join("T1DUAL", "DICOM_anon", "OutPhase"))
  assert by["t1out", "chaos_1"].label == by["t1in", "chaos_1"].label
  read = {m: adapter.read(by[m, "chaos_1"]) for m in SEQUENCES}
  t2_image, t2_label = read["t2"]
  for modality in ("t1in", "t1out"):
    image, label = read[modality]
    np.testing.assert_array_equal(label.array, t2_label.array)  # same phantom, same grid
    np.testing.assert_allclose(image.affine, t2_image.affine, atol=1e-4)
    assert not np.array_equal(image.array, t2_image.array)  # another contrast
  assert set(np.unique(t2_label.array)) == {0, 1, 2, 3, 4}
  assert adapter.labelled("t1in") == adapter.labelled("t2") == adapter.classes
  assert adapter.label_codes("t1out") == (0, 63, 126, 189, 252)


def test_the_default_is_the_one_t2spir_modality_and_only_t1dual_needs_more_phantoms():
  adapter = adapters.get_adapter("abdominal")
  assert (adapter.modalities, adapter.mr_sequences) == (("ct", "mr"), {"mr": "T2SPIR"})
  assert adapter.phantom_options == {}
  t1 = adapters.get_adapter("abdominal", mr_sequences={"t1in": "T1DUAL/InPhase"})
  assert t1.phantom_options == {"t1dual": True}
  picked = adapters.get_adapter("abdominal", mr_sequences=SEQUENCES, modalities=("t2",))
  assert picked.modalities == ("t2",)


@pytest.mark.parametrize(
  "options",
  [
    {"mr_sequences": {"t1": "T1DUAL"}},  # a folder, not a sequence
    {"mr_sequences": {"ct": "T2SPIR"}},  # 'ct' is BTCV's
    {"mr_sequences": {"a": "T2SPIR", "b": "T2SPIR"}},
    {"mr_sequences": {}},
    {"mr_sequences": {"t2": "T2SPIR"}, "modalities": ("ct", "mr")},
  ],
)
def test_bad_sequence_options_are_one_line_errors(options):
  with pytest.raises(DataError, match="abdominal option"):
    adapters.get_adapter("abdominal", **options)


def test_a_patient_without_the_sequence_and_nifti_conversions_of_several_are_refused(
  tmp_path, chaos_root
):
  generate.write_abdominal(tmp_path / "t2only", 1, 1, shape=SHAPE)
  adapter = adapters.get_adapter("abdominal", mr_sequences=SEQUENCES)
  with pytest.raises(DataError, match=r"InPhase: no T1DUAL/InPhase DICOM slices"):
    adapter.cases(str(tmp_path / "t2only"))
  os.makedirs(tmp_path / "nifti" / "BTCV")
  os.symlink(os.path.join(chaos_root, "BTCV", "img"), tmp_path / "nifti" / "BTCV" / "img")
  os.symlink(os.path.join(chaos_root, "BTCV", "label"), tmp_path / "nifti" / "BTCV" / "label")
  os.makedirs(tmp_path / "nifti" / "CHAOS" / "images")
  with pytest.raises(DataError, match="NIfTI conversions hold one MR sequence"):
    adapter.cases(str(tmp_path / "nifti"))


# ------------------------------------------------------- DICOM series told apart by sequence


def _series(description, scanning="", name=""):
  return dicom_series.Series(
    "s", "1.2", "1.3", 3, "MR", description, ("f.dcm",), "/in", "/in", None, scanning, name
  )


def test_one_matching_pattern_gives_the_modality_ignoring_case():
  assert dicom_series.match_sequence(_series("T1DUAL InPhase"), PATTERNS) == "t1in"
  assert dicom_series.match_sequence(_series("t2 spir tra"), PATTERNS) == "t2"
  # ScanningSequence and SequenceName count too.
  assert dicom_series.match_sequence(_series("ax", "SE\\IR"), {"a": "ir", "b": "gr"}) == "a"
  assert dicom_series.match_sequence(_series("ax", "", "*tse2d1"), {"t2": "tse"}) == "t2"


@pytest.mark.parametrize(
  "description, found",
  [("T1DUAL OutPhase", "no pattern"), ("T2 in-phase", "the patterns of t1in, t2")],
)
def test_no_or_several_matching_patterns_are_one_line_errors(description, found):
  with pytest.raises(DataError) as caught:
    dicom_series.match_sequence(_series(description), PATTERNS)
  text = str(caught.value)
  assert text.startswith(f"series s in /in: {found} of config.infer.dicom_sequences")
  assert f"SeriesDescription {description!r}" in text
  assert "t1in: 'in[ _-]?phase', t2: 't2'" in text and "\n" not in text


def test_sequences_decide_mr_only_and_ct_keeps_its_modality_tag():
  ct = dicom_series.Series("s", "1.2", "1.3", 3, "CT", "T2 anything", (), "/in", "/in")
  trained = ("ct", "t1in", "t2")
  assert dicom_series.modality_of(ct, trained, None, PATTERNS) == "ct"
  assert dicom_series.modality_of(_series("T1 in phase"), trained, None, PATTERNS) == "t1in"
  with pytest.raises(DataError, match="DICOM Modality 'MR' .mapped to 'mr'. is not a modality"):
    dicom_series.modality_of(_series("T1 in phase"), trained, None, {})


def test_find_series_reads_the_sequence_tags(chaos_root):
  found = dicom_series.find_series(os.path.join(chaos_root, "CHAOS", "Train_Sets", "MR", "1"))
  assert [(s.number, s.description, s.scanning_sequence) for s in found] == [
    (2, "T2SPIR", "SE"),
    (4, "T1DUAL InPhase", "GR"),
    (5, "T1DUAL OutPhase", "GR"),
  ]


@pytest.mark.parametrize(
  "sequences, message",
  [({"pet": "x"}, "names modality 'pet'"), ({"t2": "t2("}, "t2='t2\\(' is not a regex")],
)
def test_dicom_sequences_name_trained_modalities_and_compile(sequences, message):
  config = tiny_config(modalities=("ct", "t2"))
  config.data.norm.t2 = config.data.norm.mr.to_dict()
  config.infer.dicom_sequences = sequences
  with pytest.raises(ConfigError, match=message):
    config_lib.check(config)


# ------------------------------------------- three modalities: train, evaluate, predict


def test_ct_and_two_mr_sequences_train_evaluate_and_predict(tmp_path, capsys):
  config = tiny_config(modalities=("ct", "t1in", "t2"))
  config.data.dataset = "abdominal"
  config.data.root = ""
  config.data.options.mr_sequences = {"t1in": "T1DUAL/InPhase", "t2": "T2SPIR"}
  for modality in ("t1in", "t2"):
    config.data.norm[modality] = config.data.norm.mr.to_dict()
  config.infer.dicom_sequences = PATTERNS
  config.data.synthetic.update(enabled=True, n_ct=3, n_mr=3, shape=SHAPE)
  config.data.update(size=(16, 16), workers=0, split_fractions=(0.34, 0.33, 0.33))
  config.update(total_steps=2, log_every=1, eval_every=2, checkpoint_every=2, overlays=0)
  config.infer.batch_size = 8

  result = commands.train_and_evaluate(config, tmp_path)

  assert result["step"] == 2
  assert set(result["test"]["summary"]) == {"ct", "t1in", "t2"}
  with open(tmp_path / "phantoms" / ".ukd_synthetic.json") as f:
    assert json.load(f)["t1dual"] is True  # the adapter asked for T1-DUAL phantoms

  seg = segmenter.load(str(tmp_path))
  patient = tmp_path / "phantoms" / "CHAOS" / "Train_Sets" / "MR" / "1"
  out = tmp_path / "predicted"
  with pytest.raises(predict.SomeFailed, match="1 of 3 cases failed .1_5;"):
    predict.predict_paths(seg, patient, out)
  err = capsys.readouterr().err
  assert "series 1_5 in" in err and "no pattern of config.infer.dicom_sequences" in err
  assert "SeriesDescription 'T1DUAL OutPhase'" in err
  for name, modality in (("1_2", "t2"), ("1_4", "t1in")):
    with open(out / f"{name}.json") as f:
      sidecar = json.load(f)
    assert sidecar["modality"] == modality
    assert list(sidecar["classes"]) == ["0", "63", "126", "189", "252"]
  assert not (out / "1_5.nii.gz").exists()

  # An explicit --modality decides where no pattern does; a pattern that does still wins over it.
  phases = patient / "T1DUAL" / "DICOM_anon"
  predict.predict_paths(seg, phases / "OutPhase", out, "t1in")
  with open(out / "OutPhase.json") as f:
    assert json.load(f)["modality"] == "t1in"
  with pytest.raises(DataError) as caught:
    predict.predict_paths(seg, phases / "InPhase", out, "t2")
  assert str(caught.value).endswith(
    "--modality=t2 contradicts its MR sequence (SeriesDescription 'T1DUAL InPhase') (t1in); "
    "pass --modality_overrides_header to predict it as t2 anyway"
  )
