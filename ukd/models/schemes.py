"""Sharing schemes as data: which stages share kernels and norms across modalities.

Every network gives each of its stages two roles: 'encoder' or 'decoder', and its depth
from that end of the network, 'enc:k' counted from the input or 'dec:k' counted from the
output (k = 1 is the stage nearest the image; `encoder(k)` and `decoder(k)` build them).
A scheme maps roles to a `Sharing`; the first matching override wins, otherwise the
scheme's default applies.  A scheme with `ends` gives that sharing to the `x_split`
stages at each end (`get_scheme` writes them out as overrides).  Adding a scheme is
adding an entry to `SCHEMES`; no network code changes.
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


def encoder(depth: int) -> tuple[str, str]:
  """The roles of the encoder stage `depth` stages from the input (1: the first)."""
  return ("encoder", f"enc:{depth}")


def decoder(depth: int) -> tuple[str, str]:
  """The roles of the decoder stage `depth` stages from the output (1: the last)."""
  return ("decoder", f"dec:{depth}")


@dataclasses.dataclass(frozen=True)
class Scheme:
  """A sharing scheme: per-role overrides on top of a default, plus whether KD is on."""

  name: str
  default: Sharing
  overrides: tuple[tuple[str, Sharing], ...] = ()
  ends: Sharing | None = None  # the sharing of the x_split stages at each end, if any
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
      ends=SEPARATE,
      doc="modality-specific early encoder and late decoder stages (x_split each), shared middle",
    ),
    Scheme(
      "y_shape", SHARED, (("encoder", SEPARATE),), doc="modality-specific encoder, shared decoder"
    ),
  )
}


def get_scheme(name: str, x_split: int) -> Scheme:
  """The scheme `name`; one with `ends` gets them as overrides of the first `x_split`
  encoder stages and the last `x_split` decoder stages."""
  if name not in SCHEMES:
    raise ConfigError(
      f"config.model.scheme={name!r} is not a sharing scheme; choose one of {sorted(SCHEMES)}"
    )
  scheme = SCHEMES[name]
  if scheme.ends is None:
    return scheme
  depths = range(1, x_split + 1)
  ends = tuple((role, scheme.ends) for k in depths for role in (f"enc:{k}", f"dec:{k}"))
  return dataclasses.replace(scheme, overrides=ends + scheme.overrides)
