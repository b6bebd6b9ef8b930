"""Sharing schemes as data: which stages share kernels and norms across modalities.

Every network names its stages and gives each stage a set of roles ('first',
'encoder', 'decoder', 'last').  A scheme maps roles to a `Sharing`; the first
matching override wins, otherwise the scheme's default applies.  Adding a scheme
is adding an entry to `SCHEMES`; no network code changes.
"""

import dataclasses

from ukd.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Sharing:
  """Whether a stage's convolution kernels and its normalization layers are shared."""

  conv: bool
  norm: bool


SHARED = Sharing(conv=True, norm=True)
SEPARATE = Sharing(conv=False, norm=False)
SEPARATE_NORM = Sharing(conv=True, norm=False)


@dataclasses.dataclass(frozen=True)
class Scheme:
  """A sharing scheme: per-role overrides on top of a default, plus whether KD is on."""

  name: str
  default: Sharing
  overrides: tuple[tuple[str, Sharing], ...] = ()
  kd: bool = False
  doc: str = ""

  def sharing(self, roles: tuple[str, ...]) -> Sharing:
    for role, sharing in self.overrides:
      if role in roles:
        return sharing
    return self.default


SCHEMES = {
  s.name: s
  for s in (
    Scheme("single", SEPARATE, doc="nothing shared: one separate network per modality"),
    Scheme("joint", SHARED, doc="everything shared, normalization statistics included"),
    Scheme("separate_norm", SEPARATE_NORM, doc="kernels shared, normalization per modality"),
    Scheme(
      "ukd",
      SEPARATE_NORM,
      kd=True,
      doc="kernels shared, normalization per modality, KD loss (the paper)",
    ),
    Scheme(
      "x_shape",
      SHARED,
      (("first", SEPARATE), ("last", SEPARATE)),
      doc="modality-specific first and last stages, shared middle",
    ),
    Scheme(
      "y_shape", SHARED, (("encoder", SEPARATE),), doc="modality-specific encoder, shared decoder"
    ),
  )
}


def get_scheme(name: str) -> Scheme:
  if name not in SCHEMES:
    raise ConfigError(
      f"config.model.scheme={name!r} is not a sharing scheme; choose one of {sorted(SCHEMES)}"
    )
  return SCHEMES[name]
