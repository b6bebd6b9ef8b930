"""Orbax checkpoints of a work dir: the train state, the config and the data iterators.

Layout: `<workdir>/checkpoints/<step>/{state,config,data,dataset,metrics}`; `dataset` records
the splits, class names and label codes the run trained with, so evaluating or predicting
with a checkpoint never depends on a work dir's splits.json or a dataset that changed since.
Orbax writes each step into a temporary directory and renames it when complete, so a process
killed mid-save leaves at most a temporary directory that the next run removes (on GCS,
which has no rename, a step counts once Orbax has written its commit_success file);
the last complete step is always restorable.  A save the file system refuses (a full disk,
a quota, a read-only folder) ends the run with one line naming the step's folder and the
cause (`WriteError`), Orbax's own reports going to the work dir's log; the same command
resumes from the last complete step once there is room.  Two kinds of checkpoint are kept
at once: the latest (for resume) and the best by validation mean Dice (for
inference), through a preservation policy rather than `max_to_keep`, which with
a `best_fn` alone could delete the latest.  A network whose modalities share no parameter
(scheme `single`: one network per modality) also keeps each modality's best step by that
modality's validation Dice, since each of its networks is chosen on its own
(`best_steps`, `ukd.infer.load`).
"""

import contextlib
import os
import re
import weakref

import jax
import ml_collections as mc
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from ukd import files
from ukd.errors import CheckpointError, WriteError
from ukd.runtime import fault_log

BEST_METRIC = "val_dice"  # the mean over modalities; 'val_dice/<modality>' each modality's
CHECKPOINTS = "checkpoints"  # <workdir>/checkpoints/<step>


def directory(workdir) -> epath.Path:
  return files.path(workdir) / CHECKPOINTS


def resolve(path, step="best") -> tuple[epath.Path, int | str]:
  """(work dir, step) for a work dir, its checkpoints dir or one step's dir, local or remote.

  A step dir (`<workdir>/checkpoints/<n>`) selects step n; `step` may then stay 'best' or
  name the same step, anything else is refused.  Otherwise `step` is returned as given
  ('best', 'latest' or a step number, for `select_step`).
  """
  path = files.path(path)
  if not path.exists():
    raise CheckpointError(f"{path} does not exist")
  name, parent = path.name, path.parent
  if parent.name == CHECKPOINTS and name.isdigit():
    if step not in ("best", int(name), name):
      raise CheckpointError(f"{path} is step {name}, but step={step!r} was asked for")
    step = int(name)
  if (path / CHECKPOINTS).is_dir():
    return path, step
  if name == CHECKPOINTS:
    return parent, step
  if parent.name == CHECKPOINTS:
    return parent.parent, step
  raise CheckpointError(f"{path} holds no checkpoints (expected {path}/{CHECKPOINTS}/<step>)")


def manager(
  workdir,
  *,
  keep_best: int = 1,
  every: int = 1,
  last_step: int | None = None,
  read_only: bool = False,
  best_of: tuple[str, ...] = (),
) -> ocp.CheckpointManager:
  """The work dir's manager.  It decides when training saves (`mgr.should_save(step)`):
  every `every` steps, at `last_step`, and at a multi-process run's preemption sync point,
  which jax's coordination service picks for all hosts once any hears a SIGTERM.  Orbax's
  default decision would also save the first step of a fresh run; this one does not.
  `best_of`: modalities whose own best steps are kept too (a network sharing nothing)."""
  policy = None
  if not read_only:
    policy = policies.AnySavePolicy(
      [
        policies.FixedIntervalPolicy(every),
        policies.SpecificStepsPolicy(() if last_step is None else (last_step,)),
        policies.PreemptionCheckpointingPolicy(),
      ]
    )
  options = ocp.CheckpointManagerOptions(
    save_decision_policy=policy,
    best_fn=lambda metrics: metrics[BEST_METRIC],
    best_mode="max",
    preservation_policy=policies.AnyPreservationPolicy(
      [
        policies.LatestN(n=1),
        *(
          policies.BestN(
            get_metric_fn=lambda m, key=key: m[key],
            reverse=False,
            n=keep_best,
            keep_checkpoints_without_metrics=False,
          )
          for key in (BEST_METRIC, *(f"{BEST_METRIC}/{m}" for m in best_of))
        ),
      ]
    ),
    enable_async_checkpointing=not read_only,
    cleanup_tmp_directories=not read_only,
    read_only=read_only,
    # A reader saves nothing; saying so up front spares a warning about it at every load.
    save_interval_steps=0 if read_only else every,
    create=not read_only,
  )
  return ocp.CheckpointManager(
    directory(workdir), item_names=("state", "config", "dataset"), options=options
  )


def save(
  mgr,
  step: int,
  state,
  config,
  *,
  val_dice: float | None = None,
  modality_dice: dict[str, float] | None = None,
  dataset: dict | None = None,
):
  """Saves `step` asynchronously, whatever `mgr.should_save` says (training asks it first;
  tests and tools save the steps they choose); `val_dice` ranks the checkpoint for 'best',
  `modality_dice` ({modality: validation Dice}) for each modality's best (`best_steps`).
  `dataset` (JSON: {'splits': {modality: {split: ids}}, 'classes': names, 'label_codes':
  {modality: codes}}) is what `restore_dataset` gives back.  The input pipeline's position is the step itself
  (`pipeline.make_train_iterator(start_step=...)`), so it needs no item of its own."""
  items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict()))
  if dataset is not None:
    items["dataset"] = ocp.args.JsonSave(dataset)
  args = ocp.args.Composite(**items)
  metrics = None
  if val_dice is not None:
    metrics = {BEST_METRIC: float(val_dice)}
    metrics.update({f"{BEST_METRIC}/{m}": float(d) for m, d in (modality_dice or {}).items()})
  with _refusals(mgr):
    mgr.save(step, args=args, metrics=metrics, force=True)


def close(mgr) -> None:
  """Waits for the save in flight (a save runs in Orbax's threads while training goes on),
  then releases the manager's threads; a save the file system refused raises here as one
  `WriteError` line."""
  with _refusals(mgr):
    mgr.close()


_refused = weakref.WeakKeyDictionary()  # manager -> the WriteError of its refused save


@contextlib.contextmanager
def _refusals(mgr):
  """A refused write out of Orbax (`files.refused_cause`), raised by the save itself or by a
  later wait for it, becomes one `WriteError` naming the step's folder and the cause, its
  detail recorded in the work dir's log.  Orbax keeps a failed save's error and raises it
  at every later wait (the next save, `close`): the same WriteError is raised again then,
  recorded once."""
  if mgr in _refused:
    raise _refused[mgr]
  try:
    yield
  except Exception as e:
    cause = files.refused_cause(e)
    if cause is None:
      raise
    workdir = epath.Path(mgr.directory).parent
    fault_log.record(workdir, "saving a checkpoint", e)
    _refused[mgr] = WriteError(
      f"{_step_folder(mgr, e)}: cannot write: {cause}{fault_log.details(workdir)}"
    )
    raise _refused[mgr] from None


def _step_folder(mgr, error: BaseException) -> str:
  """`<checkpoints>/<step>` of the save that failed, which Orbax's error names only in its
  text (as the step's temporary folder); the checkpoints folder when it names none."""
  folder = os.fspath(mgr.directory)
  while error is not None:
    found = re.search(re.escape(folder) + r"/(\d+)", str(error))
    if found:
      return f"{folder}/{found.group(1)}"
    error = error.__cause__ or error.__context__
  return folder


def restore_train(mgr, step: int, abstract_state):
  """Restores the full train state onto the abstract state's shardings."""
  restored = mgr.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
  )
  return restored["state"]


def check_resumable(mgr, step: int, config) -> None:
  """Refuses to resume a work dir whose checkpoint holds another network or modalities,
  naming each field that differs and both its values."""
  saved = restore_config(mgr, step)
  old = _fields({key: saved[key] for key in ("model", "modalities")})
  new = _fields({key: config[key] for key in ("model", "modalities")})
  differ = [
    f"config.{k}={_shown(old, k)}, not {_shown(new, k)}"
    for k in sorted(set(old) | set(new))
    if old.get(k) != new.get(k)
  ]
  if differ:
    raise CheckpointError(
      f"{mgr.directory}/{step} was trained with {'; '.join(differ)}; "
      "use a new --workdir or the original config"
    )


def _fields(tree, prefix: str = "") -> dict:
  """{'model.width': 2, 'modalities': ('ct', 'mr'), ...}: a config's leaves by dotted name."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _fields(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: _frozen(tree)}


def _frozen(value):
  """Sequences, nested too, as tuples: JSON gives back lists for the tuples saved."""
  return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _shown(fields: dict, key: str) -> str:
  return repr(fields[key]) if key in fields else "(unset)"


def select_step(mgr, which) -> int:
  """'best' (by validation Dice; the latest when no step was validated), 'latest' or a step."""
  steps = mgr.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {mgr.directory}")
  if which == "latest":
    return max(steps)
  if which == "best":
    best = mgr.best_step()
    return best if best is not None and mgr.metrics(best) is not None else max(steps)
  try:
    step = int(which)
  except (TypeError, ValueError):
    raise CheckpointError(
      f"checkpoint {which!r} is not 'best', 'latest' or a step number"
    ) from None
  if step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {mgr.directory}; have {sorted(steps)}")
  return step


def best_steps(mgr, modalities) -> dict[str, int] | None:
  """{modality: the step of its best validation Dice} among the kept checkpoints; None when
  a modality has no such score (checkpoints saved without per-modality Dice)."""
  scores = {s: mgr.metrics(s) or {} for s in mgr.all_steps()}
  chosen = {}
  for modality in modalities:
    key = f"{BEST_METRIC}/{modality}"
    scored = [(metrics[key], step) for step, metrics in scores.items() if key in metrics]
    if not scored:
      return None
    chosen[modality] = max(scored, key=lambda pair: (pair[0], -pair[1]))[1]  # ties: earlier
  return chosen


def restore_config(mgr, step: int) -> mc.ConfigDict:
  restored = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return mc.ConfigDict(restored["config"])


def restore_dataset(mgr, step: int) -> dict | None:
  """The dataset record `save` kept with `step`; None when it kept none (older checkpoints)."""
  if not (epath.Path(mgr.directory) / str(step) / "dataset").is_dir():
    return None
  return mgr.restore(step, args=ocp.args.Composite(dataset=ocp.args.JsonRestore()))["dataset"]


def restore_variables(mgr, step: int, abstract_variables):
  """Restores only params and batch_stats (no optimizer state) onto the given shardings."""
  item = {
    "params": abstract_variables["params"],
    "batch_stats": abstract_variables.get("batch_stats", {}),
  }
  try:
    restored = mgr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=item,
          restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True,
        )
      ),
    )
  except (ValueError, KeyError) as e:
    if fault_log.unreadable(e):
      raise  # damaged, not another network: the caller says so
    raise CheckpointError(
      f"checkpoint {mgr.directory}/{step} does not fit its config's network: "
      f"{str(e).splitlines()[0][:300]}"
    ) from None
  state = restored["state"]
  _check_shapes(item, state, f"{mgr.directory}/{step}")
  return state


def _check_shapes(expected, got, where):
  """A partial restore keeps the abstract leaf wherever the checkpoint lacks an entry (e.g. a
  network trained with shared norms, loaded as one with per-modality norms): refuse that, and
  any leaf whose shape differs."""
  have = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    found = have.get(path)
    if not isinstance(found, jax.Array):
      problem = "it has no"
    elif tuple(found.shape) != tuple(leaf.shape):
      problem = f"shape {tuple(found.shape)} != {tuple(leaf.shape)} at"
    else:
      continue
    raise CheckpointError(
      f"checkpoint {where} does not fit its config's network: {problem} "
      f"{jax.tree_util.keystr(path)}"
    )
