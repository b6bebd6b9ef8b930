"""Adapters by name: a config's `data.dataset` names one, `data.options` are its options."""

from __future__ import annotations

import inspect

from ukd.data.adapters.base import Adapter
from ukd.errors import DataError, error

_REGISTRY: dict[str, type[Adapter]] = {}


def register(name: str):
  """Make an adapter class available to `get_adapter` (and so to configs) by name."""

  def add(cls):
    _REGISTRY[name] = cls
    return cls

  return add


def get_adapter(name: str, **options) -> Adapter:
  """Build the adapter registered as `name`; unknown names/options are DataErrors."""
  if name not in _REGISTRY:
    raise error(DataError, f"dataset '{name}'", f"unknown adapter; known: {sorted(_REGISTRY)}")
  cls = _REGISTRY[name]
  try:
    inspect.signature(cls).bind(**options)
  except TypeError as exc:
    raise error(DataError, f"dataset '{name}' options {sorted(options)}", str(exc)) from None
  return cls(**options)
