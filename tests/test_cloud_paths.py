"""Work dirs and dataset roots on an object store (`gs://bucket/...`).

The bucket is epath's own test double: `etils.epath.testing.mock_epath` swaps the functions
epath's backends call, and here they store `gs://bucket/x` under a local folder, with the
rules of an object store enforced (no rename, no append, no folders to make, no `walk`,
whose fsspec answer loses the scheme).  ukd's own code is not mocked.  Orbax writes array
data through TensorStore, which talks to GCS itself and cannot see this double, so no
training run happens here: what goes through epath is tested.
"""

import csv
import hashlib
import json
import os
import sys
import types

import numpy as np
import pytest
from etils.epath import testing as epath_testing

from ukd import config as config_lib
from ukd import files
from ukd.data import adapters, preprocess, splits
from ukd.data.io import volumes
from ukd.data.synthetic import generate as synthetic
from ukd.errors import ConfigError, DataError
from ukd.evaluation import evaluate
from ukd.runtime import checkpoints
from ukd.train import loop as train
from ukd.train import writers

BUCKET = "gs://bucket"


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local folder that holds `gs://bucket`; the test runs in an empty current folder
  that must stay empty (a `gs:` folder there is a URL taken for a local path)."""
  store = tmp_path / "store"
  # The store below stands in for gcsfs, which `files.path` asks for on gs:// paths.
  monkeypatch.setitem(sys.modules, "gcsfs", types.ModuleType("gcsfs"))

  def local(p):
    text = os.fspath(p)
    return os.fspath(store / text[len("gs://") :]) if text.startswith("gs://") else text

  def remote(p):
    return "gs://" + os.path.relpath(p, store)

  def is_remote(*paths):
    return any(os.fspath(p).startswith("gs://") for p in paths)

  def mapped(original, p, *args, **kwargs):
    return original(local(p), *args, **kwargs)

  def open_(original, p, mode):
    if is_remote(p):
      assert "a" not in mode and "+" not in mode, f"an object cannot be appended to: {p}"
      if "w" in mode:  # an object's name holds its whole path: no folders needed
        os.makedirs(os.path.dirname(local(p)), exist_ok=True)
    return original(local(p), mode)

  def copy(original, src, dst, overwrite):
    if is_remote(dst):
      os.makedirs(os.path.dirname(local(dst)), exist_ok=True)
    return original(local(src), local(dst), overwrite=overwrite)

  def glob(original, pattern):
    found = original(local(pattern))
    return [remote(p) for p in found] if is_remote(pattern) else found

  def refused(what):
    def call(original, p, *args, **kwargs):
      assert not is_remote(p, *[a for a in args if isinstance(a, str)]), f"{what}: {p}"
      return original(p, *args, **kwargs)

    return call

  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  with epath_testing.mock_epath(
    open=open_,
    copy=copy,
    glob=glob,
    exists=mapped,
    isdir=mapped,
    listdir=mapped,
    stat=mapped,
    remove=mapped,
    rmtree=mapped,
    makedirs=refused("an object store has no folders to make"),
    mkdir=refused("an object store has no folders to make"),
    rename=refused("an object store has no rename"),
    replace=refused("an object store has no rename"),
    walk=refused("epath's fsspec walk drops gs://"),
  ):
    yield store / "bucket"
  assert not os.listdir(cwd), "a URL was taken for a local path"


def _names(folder):
  return sorted(
    os.path.relpath(os.path.join(root, n), folder) for root, _, ns in os.walk(folder) for n in ns
  )


def test_paths_resolve_locally_and_leave_urls_alone(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setitem(sys.modules, "gcsfs", types.ModuleType("gcsfs"))  # as if installed
  assert os.fspath(files.path("gs://bucket/run")) == "gs://bucket/run"
  assert os.fspath(files.path("run")) == os.path.join(str(tmp_path), "run")
  assert files.is_remote("gs://bucket/run") and not files.is_remote("/data/gs://x")
  assert os.fspath(checkpoints.directory("gs://bucket/run")) == "gs://bucket/run/checkpoints"
  assert evaluate.output_dir("gs://bucket/run", "test", 2) == "gs://bucket/run/eval/test-step2"
  with pytest.raises(ConfigError, match=r"^ftp://host/run: unsupported storage ftp://"):
    files.path("ftp://host/run")


def test_atomic_writes_upload_whole_files(bucket):
  files.write_text(f"{BUCKET}/run/notes.txt", "first")
  files.write_text(f"{BUCKET}/run/notes.txt", "second")
  with pytest.raises(RuntimeError, match="midway"):
    with files.replacing(f"{BUCKET}/run/notes.txt") as tmp:
      with open(tmp, "w") as f:
        f.write("thi")
      raise RuntimeError("midway")
  assert (bucket / "run" / "notes.txt").read_text() == "second"
  with files.new_directory(f"{BUCKET}/run/entry") as tmp:
    for name in ("b.npy", ".marker", "a.npy"):
      with open(os.path.join(tmp, name), "w") as f:
        f.write(name)
  assert _names(bucket / "run") == ["entry/.marker", "entry/a.npy", "entry/b.npy", "notes.txt"]


def test_splits_metrics_and_evaluation_land_in_the_bucket(bucket):
  cases = [adapters.Case(f"c{k}", m, "image", "label") for m in ("ct", "mr") for k in range(5)]
  made = splits.load_or_make_splits(f"{BUCKET}/run", cases, seed=0)
  assert json.loads((bucket / "run" / "splits.json").read_text()) == made
  assert splits.load_or_make_splits(f"{BUCKET}/run", cases, seed=1) == made  # read back

  writer = writers.create(f"{BUCKET}/run", start_step=0, total_steps=2, main_process=True)
  writer.write_scalars(1, {"loss": 1.0})
  writer.flush()
  lines = (bucket / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line) for line in lines] == [{"step": 1, "loss": 1.0}]
  writer.write_scalars(2, {"loss": 0.5})
  writer.close()
  lines = (bucket / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1, 2]
  (events,) = os.listdir(bucket / "run" / "tensorboard")
  assert events.startswith("events.out.tfevents.")
  # Step 2 died unsaved.
  resumed = writers.create(f"{BUCKET}/run", start_step=1, total_steps=2, main_process=True)
  lines = (bucket / "run" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [1]
  resumed.close()

  rows = [
    dict(case="c1", modality="ct", **{"class": "A"}, dice=0.5, assd=1.0, hd95=2.0),
    dict(case="c1", modality="ct", **{"class": "B"}, dice=0.7, assd=float("nan"), hd95=3.0),
  ]
  summary = evaluate.summarize_rows(rows, ("background", "A", "B"))
  picture = np.zeros((4, 6, 3), np.uint8)
  out_dir = evaluate.output_dir(f"{BUCKET}/run", "test", 2)
  evaluate.write_results(out_dir, rows, summary, {"ct/c1": picture}, step=2, split="test")
  out = bucket / "run" / "eval" / "test-step2"
  record = json.loads((out / "metrics.json").read_text())
  assert (record["step"], record["split"], record["metrics"]["ct"]["A"]["dice"]["mean"]) == (
    2,
    "test",
    0.5,
  )
  with open(out / "cases.csv", newline="") as f:
    assert [r["class"] for r in csv.DictReader(f)] == ["A", "B"]
  assert _names(out) == ["cases.csv", "metrics.json", "overlays/ct/c1.png"]


@pytest.fixture
def phantoms(bucket):
  """A tiny MM-WHS phantom dataset generated straight into gs://bucket/data."""
  cfg = dict(n_ct=1, n_mr=1, shape=(8, 8, 8), seed=0)
  assert synthetic.ensure(f"{BUCKET}/data", "mmwhs", **cfg) == f"{BUCKET}/data"
  assert synthetic.ensure(f"{BUCKET}/data", "mmwhs", **cfg) == f"{BUCKET}/data"  # not remade
  return bucket / "data"


def test_a_dataset_in_the_bucket_is_listed_and_read_like_its_local_copy(phantoms):
  assert ".ukd_synthetic.json" in os.listdir(phantoms)
  adapter = adapters.get_adapter("mmwhs")
  cases = adapter.cases(f"{BUCKET}/data")
  assert [(c.id, c.modality) for c in cases] == [("ct_train_1001", "ct"), ("mr_train_1001", "mr")]
  for case in cases:
    assert case.image.startswith(f"{BUCKET}/data/{case.modality}_train/")
    image, label = adapter.read(case)
    mirror = adapters.Case(
      case.id,
      case.modality,
      case.image.replace(BUCKET, str(phantoms.parent)),
      case.label.replace(BUCKET, str(phantoms.parent)),
    )
    local_image, local_label = adapter.read(mirror)
    np.testing.assert_array_equal(image.array, local_image.array)
    np.testing.assert_array_equal(label.array, local_label.array)
    assert image.spacing == local_image.spacing and image.source == case.image
  with pytest.raises(DataError, match=rf"^{BUCKET}/data/ct_train/none.nii.gz: file not found"):
    volumes.read_image(f"{BUCKET}/data/ct_train/none.nii.gz")


def test_chaos_dicom_in_the_bucket_is_read_like_its_local_copy(bucket):
  pytest.importorskip("pydicom")
  synthetic.ensure(f"{BUCKET}/abdomen", "abdominal", n_ct=0, n_mr=1, shape=(8, 8, 8), seed=0)
  adapter = adapters.get_adapter("abdominal", modalities=("mr",))
  (case,) = adapter.cases(f"{BUCKET}/abdomen")
  assert case.image == f"{BUCKET}/abdomen/CHAOS/Train_Sets/MR/1/T2SPIR/DICOM_anon"
  image, label = adapter.read(case)
  local = adapters.Case(
    case.id, "mr", *(p.replace(BUCKET, str(bucket)) for p in (case.image, case.label))
  )
  local_image, local_label = adapter.read(local)
  np.testing.assert_array_equal(image.array, local_image.array)
  np.testing.assert_array_equal(label.array, local_label.array)


def test_a_remote_cache_dir_is_kept_on_local_disk(phantoms, tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  remote = f"{BUCKET}/run/cache"
  kept = preprocess.local_cache_dir(remote)
  digest = hashlib.sha256(remote.encode()).hexdigest()[:16]
  assert kept == os.path.join(str(tmp_path / "xdg"), "ukd", digest)
  assert preprocess.local_cache_dir(f"{BUCKET}/other/cache") != kept
  assert preprocess.local_cache_dir("relative/cache") == "relative/cache"  # local: as given

  adapter = adapters.get_adapter("mmwhs")
  config = config_lib.default()
  config.data.size = (8, 8)
  settings = config_lib.preprocessing(config)["ct"]
  (entry,) = preprocess.cache_cases(adapter, adapter.cases(f"{BUCKET}/data")[:1], settings, remote)
  assert os.path.dirname(os.path.dirname(entry["image"])) == kept
  assert np.load(entry["image"], mmap_mode="r").shape == (8, 8, 8)
  assert not (phantoms.parent / "run").exists()  # nothing went to the bucket


def test_training_prepares_its_data_from_a_bucket_into_a_bucket(bucket, tmp_path, monkeypatch):
  """What training does before its first step, with the phantoms, the work dir and so the
  default cache dir all in the bucket: the split lands there, the cache on local disk."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  config = config_lib.default()
  config.data.synthetic.update(enabled=True, n_ct=3, n_mr=3, shape=(8, 8, 8))
  config.data.size = (8, 8)
  root = train.dataset_root(config, f"{BUCKET}/run")
  assert root == f"{BUCKET}/run/phantoms"
  data = train.prepare_data(config, root, f"{BUCKET}/run")
  saved = json.loads((bucket / "run" / "splits.json").read_text())
  assert saved == data.record()["splits"]
  kept = preprocess.local_cache_dir(f"{BUCKET}/run/cache")
  for entries in data.train_sources.values():
    assert entries and all(e["image"].startswith(kept + os.sep) for e in entries)
  assert sorted(os.listdir(bucket / "run")) == ["phantoms", "splits.json"]
