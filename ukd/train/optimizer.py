"""The optimizer and its learning-rate schedule: Adam with a staircase exponential decay, as
the paper trains (`config.optim`)."""

import optax


def learning_rate(config):
  """Adam's step size: `lr` multiplied by `decay_rate` every `decay_steps` steps (staircase)."""
  return optax.exponential_decay(
    config.optim.lr,
    transition_steps=config.optim.decay_steps,
    decay_rate=config.optim.decay_rate,
    staircase=True,
  )


def make_optimizer(config):
  return optax.adam(learning_rate(config), eps=config.optim.eps)
