"""The jit-compiled train and eval steps.

A train step takes one batch per modality, e.g. {'ct': {'image', 'label'},
'mr': {...}}: the batches are paired by step, not by anatomy.  All modalities
run through the network in one pass (see `loss_terms`); the loss is the
sum of every modality's Dice and weighted cross-entropy, plus the KD term (when
the scheme uses it) and the L2 penalty on the kernels.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import optax

from ukd import config as config_lib
from ukd.runtime import mesh as mesh_lib
from ukd.train import losses, optimizer
from ukd.train import state as state_lib

# One batch per modality: {'ct': {'image': [B, ..., channels], 'label': [B, ...]}, 'mr': ...}.
Batch = Mapping[str, Mapping[str, jax.Array]]
# Flax variable collections ('params', 'batch_stats'): nested dicts of arrays.
Variables = Mapping[str, Any]


def loss_terms(
  model: nn.Module,
  config: mc.ConfigDict,
  params: Variables,
  batch_stats: Variables,
  batch: Batch,
  rng: jax.Array,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], Variables]]:
  """The training loss of one batch and its terms.

  One forward pass over every modality's samples at once, the batch being the
  modalities' batches concatenated in `config.modalities` order: a shared layer
  (conv or norm) runs once on the mixed batch, so a shared norm normalises with the
  statistics of all modalities together, as its running average does at test time;
  a per-modality layer runs on its own modality's part only.

  Args:
    model: the network (`ukd.models.build`).
    config: the run's config; `modalities`, the `loss` weights and the label sets
      (`data.label_sets`) are read.
    params: the trainable parameters.
    batch_stats: the norms' running statistics.
    batch: one batch of each modality of `config.modalities`.
    rng: the dropout key of this step.

  Returns:
    (total loss, (terms, updated batch_stats)); terms are named scalars: 'dice/<modality>',
    'ce/<modality>', 'kd' (schemes with KD), 'l2' (unweighted) and 'loss' (the total).
  """
  modalities = tuple(config.modalities)
  images = jnp.concatenate([batch[m]["image"] for m in modalities], axis=0)
  out, updates = model.apply(
    {"params": params, "batch_stats": batch_stats},
    images,
    modality=modalities,
    train=True,
    mutable=["batch_stats"],
    rngs={"dropout": rng},
  )
  logits = dict(zip(modalities, jnp.split(out, len(modalities), axis=0)))
  labels = {m: batch[m]["label"] for m in modalities}
  # Modalities whose labels hold only some classes: their losses merge the others into
  # background (`ukd.train.losses`); the others run the losses unchanged.
  partial = config_lib.label_masks(config)
  terms = {}
  for m in modalities:
    terms[f"dice/{m}"] = losses.dice_loss(logits[m], labels[m], partial.get(m))
    terms[f"ce/{m}"] = losses.weighted_ce_loss(logits[m], labels[m], partial.get(m))

  w = config.loss
  total = sum(w.dice * terms[f"dice/{m}"] + w.ce * terms[f"ce/{m}"] for m in modalities)
  if model.scheme.kd and len(modalities) > 1:
    labelled = None
    if partial:
      everything = np.ones(config.model.num_classes, bool)
      labelled = {m: partial.get(m, everything) for m in modalities}
    terms["kd"] = losses.kd_loss(
      logits,
      labels,
      temperature=w.temperature,
      distance=w.kd_distance,
      absent=w.kd_absent,
      labelled=labelled,
    )
    total = total + w.kd * terms["kd"]
    # How much of the objective KD is (before L2): small, it has little room to act.
    terms["kd/loss_share"] = w.kd * terms["kd"] / total
  terms["l2"] = losses.l2_loss(params, w.l2_scope)
  total = total + w.l2 * terms["l2"]
  terms["loss"] = total
  return total, (terms, updates["batch_stats"])


def train_step(
  model: nn.Module,
  config: mc.ConfigDict,
  tx: optax.GradientTransformation,
  state: state_lib.TrainState,
  batch: Batch,
) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer step; returns the new state and the step's metrics (the `loss_terms`
  terms, 'grad_norm' and the learning rate 'lr' the step used)."""
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(functools.partial(loss_terms, model, config), has_aux=True)
  (_, (terms, stats)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(
    terms, grad_norm=optax.tree.norm(grads), lr=optimizer.learning_rate(config)(state.step)
  )
  if config.loss.get("kd_grad_share") and "kd" in terms:
    metrics["kd/grad_share"] = (
      _kd_gradient_norm(model, config, state, batch, rng) / (metrics["grad_norm"])
    )
  new_state = state.replace(
    step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state
  )
  return new_state, metrics


def _kd_gradient_norm(model, config, state, batch, rng) -> jax.Array:
  """The norm of the weighted KD term's own gradient: a second forward and backward pass,
  so only runs that ask (`loss.kd_grad_share`) pay for it."""

  def kd(params):
    terms = loss_terms(model, config, params, state.batch_stats, batch, rng)[1][0]
    return config.loss.kd * terms["kd"]

  return optax.tree.norm(jax.grad(kd)(state.params))


def make_train_step(
  model: nn.Module, config: mc.ConfigDict, mesh: jax.sharding.Mesh
) -> Callable[[state_lib.TrainState, Batch], tuple[state_lib.TrainState, dict[str, jax.Array]]]:
  """The data-parallel train step: batch sharded on 'data', state replicated and donated."""
  tx = optimizer.make_optimizer(config)
  repl = mesh_lib.replicated(mesh)
  return jax.jit(
    functools.partial(train_step, model, config, tx),
    in_shardings=(repl, mesh_lib.batch_sharding(mesh)),
    out_shardings=(repl, repl),
    donate_argnums=0,
  )


def nonfinite_terms(metrics: Mapping[str, np.ndarray | float]) -> list[str]:
  """Names of the metrics that are NaN or infinite.  `metrics` are host values, already
  fetched (`jax.device_get`): numpy checks them where they are, with no device work."""
  return [k for k, v in metrics.items() if not np.all(np.isfinite(v))]
