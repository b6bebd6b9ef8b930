"""The modes of the command line (`ukd.main`), one function each: where the packages meet.

Training, serving and evaluation each do one job and never reach for another's: evaluation
scores what a predictor gives it and never loads a checkpoint; the loop trains and saves.  A
mode that needs several of them (train, then choose post-processing and evaluate; evaluate a
work dir) is put together here, which is why this module sits above them all.
"""

import os
from typing import Any

import jax
from etils import epath
from jax.experimental import multihost_utils

from ukd import config as config_lib
from ukd import files
from ukd.data import check as check_lib
from ukd.data import splits
from ukd.errors import ConfigError, DataError, WriteError, import_extra
from ukd.evaluation import evaluate as evaluate_lib
from ukd.evaluation import postprocess as postprocess_lib
from ukd.runtime import checkpoints, lock
from ukd.serve import export as export_lib
from ukd.serve import inputs, segmenter
from ukd.serve import predict as predict_lib
from ukd.train import loop


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict:
  """Trains (or resumes) in `workdir`, then loads the best checkpoint ONCE: the same
  Segmenter predicts the validation split to choose post-processing (none without validation
  cases) and then the test split, so the network is restored and compiled one time.

  The whole run holds the work dir's lock (`ukd.runtime.lock`): a second training there is
  refused.

  Returns:
    {'step': the last step, 'val': the last validation's scalars, 'test': `evaluate`'s result
    for the best checkpoint}.
  """
  preemption = loop.Preemption()  # before any work: a SIGTERM now still saves a step
  workdir = files.path(workdir)
  files.makedirs(workdir)
  with lock.training(workdir, main_process=jax.process_index() == 0):
    trained = loop.train(config, workdir, preemption)
    workdir, step = checkpoints.resolve(workdir, "best")
    seg = segmenter.load(workdir, step, postprocess="none")
    if trained["validated"]:
      choose_postprocessing(seg, workdir)
    # Every test case's overlay, unless config.overlays is 0.
    tested = evaluate_split(seg, workdir, overlays=seg.config.overlays > 0)
  return {"step": trained["step"], "val": trained["val"], "test": tested}


def evaluate(
  workdir: str | os.PathLike,
  *,
  split: str = "test",
  step: str | int = "best",
  overlays: bool = True,
  tta: bool | None = None,
  postprocess: str = "auto",
  output=None,
) -> dict[str, Any]:
  """`--mode=evaluate`: scores a work dir's checkpoint on one split (`evaluate_split`).

  Where the results go is checked writable before the checkpoint loads: the work dir's
  `eval/`, or `output` (`--output`), which a read-only work dir needs.

  Args:
    workdir: a training run's work dir, local or on cloud storage.
    split: 'train', 'val' or 'test'.
    step: the checkpoint: 'best', 'latest' or a step number.
    overlays: also draw every case's overlay picture.
    tta: mirroring test-time augmentation (None: the config's `infer.tta`).
    postprocess: 'auto', 'none' or a postprocessing.json (`postprocess.load_rules`);
      with rules, the same predictions are scored as predicted and post-processed.
    output: the folder that stands for the work dir's `eval/` (None: `eval/`).
  """
  if split not in splits.SPLIT_NAMES:
    raise DataError(f"split {split!r} is not one of {list(splits.SPLIT_NAMES)}")
  workdir, step = checkpoints.resolve(workdir, step)
  root = _evaluation_root(workdir, output)
  seg = segmenter.load(workdir, step=step, tta=tta, postprocess="none")
  return evaluate_split(
    seg, workdir, split=split, overlays=overlays, postprocess=postprocess, output=root
  )


def _evaluation_root(workdir, output) -> epath.Path:
  """`output`, or the work dir's `eval/`, checked writable (`files.check_writable`); the
  line for a work dir that is not names the flag that gets around it."""
  if output:
    files.check_writable(files.path(output))
    return files.path(output)
  root = files.path(workdir) / "eval"
  try:
    files.check_writable(root)
  except WriteError as e:
    raise WriteError(f"{e}; pass --output=DIR to write the evaluation elsewhere") from e
  return root


def evaluate_split(
  seg,
  workdir,
  *,
  split: str = "test",
  overlays: bool = True,
  postprocess: str = "auto",
  output=None,
) -> dict[str, Any]:
  """Scores a loaded checkpoint on one split of its work dir into `evaluate.output_dir`
  (under `output`, when given, instead of the work dir's `eval/`).

  The split is the one the checkpoint recorded (`checkpoints.save`; `splits.json` for
  checkpoints that recorded none), so the test cases are the ones training never saw, even
  if the dataset gained cases since.  Prints the table.

  Returns:
    {'summary': `evaluate.summarize_rows`' result, 'cases': the rows, 'dir': the output
    folder, 'step': the checkpoint's step, 'split': `split`, 'postprocessed': {'rules',
    'cases', 'summary'} of the post-processed labels, or None without rules, 'not_scored':
    {modality: classes its references do not label}}.
  """
  rules = postprocess_lib.load_rules([workdir], postprocess)
  adapter, chosen = segmenter.split_cases(seg, workdir, split)
  if not chosen:
    raise DataError(f"{workdir}: the {split} split has no cases of {list(seg.config.modalities)}")
  out_dir = evaluate_lib.output_dir(workdir, split, seg.step_name, tta=seg.tta, root=output)
  result = evaluate_lib.evaluate_cases(
    seg,
    adapter,
    chosen,
    out_dir=out_dir,
    overlays=None if overlays else 0,
    split=split,
    rules=rules,
  )
  fixed = result.get("postprocessed")
  if jax.process_index() == 0:
    steps = seg.step.items() if isinstance(seg.step, dict) else ()
    which = ", ".join(f"{m} from step {s}" for m, s in steps) or f"step {seg.step}"
    print(f"{split} split, checkpoint {which}, {len(chosen)} volumes -> {out_dir}")
    if fixed:
      print("as predicted (raw network labels):")
    print(evaluate_lib.format_table(result["summary"], adapter.classes))
    for modality, names in result["not_scored"].items():
      print(f"{modality}: not scored (its references do not label them): {', '.join(names)}")
    if fixed:
      print(f"post-processed ({postprocess_lib.describe(rules, adapter.classes)}):")
      print(evaluate_lib.format_table(fixed["summary"], adapter.classes))
  return dict(
    summary=result["summary"],
    cases=result["cases"],
    dir=out_dir,
    step=seg.step,
    split=split,
    postprocessed=fixed,
    not_scored=result["not_scored"],
  )


def postprocess(workdir: str, step="best") -> dict:
  """`--mode=postprocess`: chooses a work dir's rules (`choose_postprocessing`)."""
  workdir, step = checkpoints.resolve(workdir, step)
  return choose_postprocessing(segmenter.load(workdir, step, postprocess="none"), workdir)


def choose_postprocessing(seg, workdir) -> dict:
  """Chooses a loaded checkpoint's rules on its validation split into
  `<workdir>/postprocessing.json`.

  Every validation case is predicted once, as evaluation predicts it (several processes
  share the cases out and gather the scores; process 0 writes), and every rule is tried on
  those labels (`postprocess.decide`).  Prints the rules chosen.

  Returns:
    The record written (`ukd.evaluation.postprocess`'s docstring).
  """
  adapter, cases = segmenter.split_cases(seg, workdir, "val")
  if not cases:
    raise DataError(f"{workdir}: the val split has no cases to choose post-processing on")
  num_classes = int(seg.config.model.num_classes)
  label_sets = seg.config.data.get("label_sets")  # configs saved before label sets: none
  rows = []
  for case in cases[jax.process_index() :: jax.process_count()]:
    image, label = adapter.read(case)
    if label is None:
      raise DataError(f"case {case.id}: no label to choose post-processing on ({case.image})")
    pred, _ = seg.predict_volume(image, case.modality)
    scores = postprocess_lib.candidate_scores(label.array, pred, image.spacing, num_classes)
    # A class the references do not label has no truth to judge a rule by: any rule that
    # removed it would look perfect, so it gets none.
    scored = evaluate_lib.scored_classes(adapter, case.modality, label_sets)
    scores = {k: v for k, v in scores.items() if adapter.classes[int(k)] in scored}
    rows.append({"modality": case.modality, "case": case.id, "scores": scores})
  rows = evaluate_lib.gather_rows(rows)
  modalities = [m for m in seg.config.modalities if any(r["modality"] == m for r in rows)]
  by_modality = {m: [r["scores"] for r in rows if r["modality"] == m] for m in modalities}
  rules, numbers = postprocess_lib.decide(by_modality, list(adapter.classes))
  record = dict(
    rules=rules,
    step=seg.step,
    split="val",
    cases={m: len(of) for m, of in by_modality.items()},
    connectivity=postprocess_lib.CONNECTIVITY,
    validation=numbers,
  )
  path = epath.Path(workdir) / postprocess_lib.FILE
  if jax.process_index() == 0:
    files.write_json(path, record)
    print(
      f"post-processing chosen on {len(cases)} validation volumes (step {seg.step_name}) -> {path}"
    )
    print(f"post-processing: {postprocess_lib.describe(rules, adapter.classes)}")
  if jax.process_count() > 1:  # the others read the file next (the test evaluation)
    multihost_utils.sync_global_devices("ukd: postprocessing.json written")
  return record


def check(config, workdir) -> dict:
  """`--mode=check`: reads every case of the config's dataset and summarises it."""
  config = config_lib.check(config)
  return check_lib.check_dataset(config, loop.dataset_root(config, workdir))


def predict(
  workdir,
  input,
  output,
  modality,
  *,
  step="best",
  backend="jax",
  precision="float32",
  tta=None,
  postprocess="auto",
  **options,
) -> list[str]:
  """`--mode=predict`: label maps (and what `options` ask for) of every scan under `input`.

  The inputs, and that `output` can be written, are checked before the model is loaded, so a
  NIfTI without `--modality` or a read-only output fails at once rather than after the
  checkpoint."""
  if not modality and inputs.is_nifti(input):
    raise ConfigError("--modality is required for NIfTI input (DICOM has its Modality tag)")
  if inputs.needs_dicom(input):
    import_extra("pydicom", "dicom", "DICOM input")
  if "dicom_seg" in options.get("output_format", ""):
    for module in ("pydicom", "highdicom"):
      import_extra(module, "dicom", "--output_format=dicom_seg")
  files.check_writable(files.path(output))
  seg = export_lib.load_backend(
    workdir, step, backend=backend, precision=precision, tta=tta, postprocess=postprocess
  )
  written = predict_lib.predict_paths(seg, input, output, modality, **options)
  print(f"wrote {len(written)} file(s) to {output}")
  return written
