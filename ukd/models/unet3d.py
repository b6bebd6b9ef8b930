"""The paper's 3D abdominal U-Net, laid out as the authors' 3D code.

Encoder: [16, 32] pool [32, 64] pool [64, 128] pool [128, 256], the two deepest
levels with 3x3x1 kernels (the patches are thin: 256x256x8).  Decoder, per level:
a stride-2 transposed convolution (to 128, 128 and 64 channels with 3x3x1, 3x3x1
and 3x3x3 kernels) followed by batch normalization and leaky ReLU, concatenation
with the encoder's skip, then two convolutions at 128 (3x3x1), 64 and 32 channels.
A 1x1x1 head gives the logits (with a bias, as the reference's, under `head_bias`).
Every convolution is followed by batch normalization and leaky ReLU.  Widths scale
with `width / 16`.  With `init='reference'` the transposed convolutions start from
the reference's uncut normal of std 0.01, the others from its truncated normal.

Stages for the sharing schemes (`ukd.models.schemes`): the encoder levels from the
input (enc:1 = enc1 .. enc:4 = bottom), the decoder levels from the output (dec:1 =
dec1 with the head, dec:2 = dec2, dec:3 = dec3).
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from ukd.models import layers, schemes
from ukd.models.schemes import Scheme

# (stage name, widths in units of width/16, kernel).  A 2x2x2 max-pool follows every level
# but the last.
ENCODER = (
  ("enc1", (16, 32), (3, 3, 3)),
  ("enc2", (32, 64), (3, 3, 3)),
  ("enc3", (64, 128), (3, 3, 1)),
  ("bottom", (128, 256), (3, 3, 1)),
)
# (stage name, transposed-conv width and kernel, width and kernel of its two convolutions).
DECODER = (
  ("dec3", 128, (3, 3, 1), 128, (3, 3, 1)),
  ("dec2", 128, (3, 3, 1), 64, (3, 3, 3)),
  ("dec1", 64, (3, 3, 3), 32, (3, 3, 3)),
)
POOL = (2, 2, 2)
# Stages at each end the x_shape scheme can make per modality: all three decoder levels,
# so that the bottom level always stays shared.
END_STAGES = 3


class ConvNormAct(nn.Module):
  """A (transposed) convolution, batch norm, leaky ReLU; each shared or per modality."""

  features: int
  kernel_size: tuple[int, ...]
  modalities: tuple[str, ...]
  conv_shared: bool
  norm_shared: bool
  kernel_init: layers.KernelInits
  dtype: str
  conv: Callable
  transpose: bool = False

  @nn.compact
  def __call__(self, x, modality, train):
    x = layers.ModalityConv(
      self.modalities,
      self.conv_shared,
      features=self.features,
      kernel_size=self.kernel_size,
      strides=POOL if self.transpose else 1,
      transpose=self.transpose,
      kernel_init=self.kernel_init,
      dtype=self.dtype,
      conv=self.conv,
    )(x, modality)
    x = layers.ModalityNorm(self.modalities, self.norm_shared)(x, modality, train)
    return layers.leaky_relu(x)


class UNet3D(nn.Module):
  """Input [B, H, W, S, 1]; logits [B, H, W, S, C].  H, W and S must be divisible by 8.

  `modality` is one name or a tuple of names for a batch of equal modality parts (see
  `layers`)."""

  num_classes: int
  modalities: tuple[str, ...]
  scheme: Scheme
  width: int = 16
  kernel_init: layers.KernelInits = layers.KERNEL_INITS["reference"]
  dtype: str = "float32"  # convolutions' computation dtype (bfloat16: mixed precision)
  conv: Callable = lax.conv_general_dilated  # the convolution: a value of layers.CONV_GRADS
  head_bias: bool = False  # a bias on the logits (the reference's 3D head has one)

  @nn.compact
  def __call__(self, x, modality, train: bool = False):
    if x.ndim != 5 or any(n % 8 for n in x.shape[1:4]):
      raise ValueError(f"unet3d expects [B, H, W, S, 1] with H, W, S divisible by 8; got {x.shape}")
    mods, init = self.modalities, self.kernel_init
    scale = lambda f: max(1, f * self.width // 16)
    # Every layer: this network's modalities, initialiser, compute dtype and gradients.
    layer = functools.partial(
      ConvNormAct, modalities=mods, kernel_init=init, dtype=self.dtype, conv=self.conv
    )

    skips = []
    for i, (name, widths, kernel) in enumerate(ENCODER):
      if i:
        x = nn.max_pool(x, POOL, strides=POOL)
      s = self.scheme.sharing(schemes.encoder(i + 1))
      for j, f in enumerate(widths):
        x = layer(scale(f), kernel, conv_shared=s.conv, norm_shared=s.norm, name=f"{name}_{j}")(
          x, modality, train
        )
      skips.append(x)

    for i, ((name, up, up_kernel, f, kernel), skip) in enumerate(
      zip(DECODER, reversed(skips[:-1]))
    ):
      s = self.scheme.sharing(schemes.decoder(len(DECODER) - i))
      x = layer(
        scale(up),
        up_kernel,
        conv_shared=s.conv,
        norm_shared=s.norm,
        transpose=True,
        name=f"{name}_up",
      )(x, modality, train)
      x = jnp.concatenate([x, skip], axis=-1)
      for j in range(2):
        x = layer(scale(f), kernel, conv_shared=s.conv, norm_shared=s.norm, name=f"{name}_{j}")(
          x, modality, train
        )

    head = self.scheme.sharing(schemes.decoder(1))  # the last decoder level's
    return layers.ModalityConv(
      mods,
      head.conv,
      features=self.num_classes,
      kernel_size=(1, 1, 1),
      use_bias=self.head_bias,
      kernel_init=init,
      dtype=self.dtype,
      conv=self.conv,
      name="head",
    )(x, modality)
