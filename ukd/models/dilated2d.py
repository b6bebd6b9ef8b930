"""The paper's 2D cardiac network: pre-activation residual blocks, dilation, 8x depth-to-space.

Layout (base width w = 16 in the paper, C classes):
  stem 3x3 conv to w;
  residual stages of widths w | 2w | 4w,4w | 8w,8w | 16w,16w | 16w,16w | 32w,32w
  with a 2x2 max-pool after each of the first three stages;
  two dilated (rate 2) residual blocks at 32w; two BN-LReLU-conv layers at 32w;
  a 3x3 conv to 8*8*C*k channels (+BN+LReLU, k = 8 in the paper); 8x depth-to-space;
  a 5x5 conv to C logits (a bias with `head_bias`; the reference has none).
Each residual block is two BN -> leaky ReLU -> 3x3 conv -> dropout layers with a
zero-padding shortcut where the width grows; the two layers after the dilated
blocks end in dropout too, as in the reference code.  Kernels start from the
reference's truncated normal (std 0.01) unless `init='lecun'`.  Every convolution
pads with zeros, except with `pad='reference'`: then the last two (the 3x3 before
the depth-to-space and the 5x5 head) pad by mirroring, as the reference's.
At w = 16, C = 5 the kernels hold 39,302,456 weights.

Stages for the sharing schemes (`ukd.models.schemes`), by resolution level from the
input: enc:1 the stem and stage1 (full), enc:2 stage2 (1/2), enc:3 stage3 (1/4),
enc:4 stages 4-7 and the dilated blocks (1/8); from the output: dec:1 the 3x3 conv
before the depth-to-space and the head, dec:2 and dec:3 the two layers after the
dilated blocks (the later one is dec:2).
"""

import functools
from collections.abc import Callable

import flax.linen as nn
from jax import lax

from ukd.models import layers, schemes
from ukd.models.schemes import Scheme

# (stage name, widths of its residual blocks in units of the base width, max-pool after it,
# encoder depth: its resolution level).
RESIDUAL_STAGES = (
  ("stage1", (1,), True, 1),
  ("stage2", (2,), True, 2),
  ("stage3", (4, 4), True, 3),
  ("stage4", (8, 8), False, 4),
  ("stage5", (16, 16), False, 4),
  ("stage6", (16, 16), False, 4),
  ("stage7", (32, 32), False, 4),
)
BOTTOM = 4  # the encoder depth of the 1/8 level: stages 4-7 and the dilated blocks
# Stages at each end the x_shape scheme can make per modality: all three of the decoder's,
# so that the deepest encoder level always stays shared.
END_STAGES = 3
UPSAMPLE = 8  # three 2x2 pools, undone by one 8x depth-to-space


class ResidualBlock(nn.Module):
  """Pre-activation residual block; parameters shared or per modality as `sharing` says."""

  features: int
  modalities: tuple[str, ...]
  conv_shared: bool
  norm_shared: bool
  dropout: float
  kernel_init: layers.KernelInits
  dtype: str
  conv: Callable
  dilation: int = 1

  @nn.compact
  def __call__(self, x, modality, train):
    h = x
    for _ in range(2):
      h = layers.ModalityNorm(self.modalities, self.norm_shared)(h, modality, train)
      h = layers.leaky_relu(h)
      h = layers.ModalityConv(
        self.modalities,
        self.conv_shared,
        features=self.features,
        kernel_size=(3, 3),
        dilation=self.dilation,
        kernel_init=self.kernel_init,
        dtype=self.dtype,
        conv=self.conv,
      )(h, modality)
      h = layers.Dropout(self.dropout)(h, deterministic=not train)
    return h + layers.pad_channels(x, self.features)


class Dilated2D(nn.Module):
  """The 2D network; input [B, H, W, 3] (3 adjacent slices), logits [B, H, W, C].

  `modality` is one name or a tuple of names for a batch of equal modality parts
  (see `layers`)."""

  num_classes: int
  modalities: tuple[str, ...]
  scheme: Scheme
  width: int = 16
  dropout: float = 0.25
  upsample_mult: int = 8
  kernel_init: layers.KernelInits = layers.KERNEL_INITS["reference"]
  dtype: str = "float32"  # convolutions' computation dtype (bfloat16: mixed precision)
  conv: Callable = lax.conv_general_dilated  # the convolution: a value of layers.CONV_GRADS
  head_bias: bool = False  # a bias on the logits (the reference's head has none)
  pad: str = "zeros"  # 'reference': the last two convolutions pad by mirroring

  @nn.compact
  def __call__(self, x, modality, train: bool = False):
    if x.ndim != 4 or x.shape[1] % UPSAMPLE or x.shape[2] % UPSAMPLE:
      raise ValueError(
        f"dilated2d expects [B, H, W, 3] with H and W divisible by {UPSAMPLE}; got {x.shape}"
      )
    w, mods = self.width, self.modalities
    drop = lambda h: layers.Dropout(self.dropout)(h, deterministic=not train)
    # Every convolution: this network's modalities, initialiser, compute dtype and gradients.
    conv = functools.partial(
      layers.ModalityConv,
      mods,
      kernel_init=self.kernel_init,
      dtype=self.dtype,
      conv=self.conv,
    )
    block = functools.partial(
      ResidualBlock,
      modalities=mods,
      dropout=self.dropout,
      kernel_init=self.kernel_init,
      dtype=self.dtype,
      conv=self.conv,
    )
    s = self.scheme.sharing(schemes.encoder(1))
    h = conv(s.conv, features=w, kernel_size=(3, 3), name="stem")(x, modality)

    for name, widths, pool, depth in RESIDUAL_STAGES:
      s = self.scheme.sharing(schemes.encoder(depth))
      for i, k in enumerate(widths):
        h = block(k * w, conv_shared=s.conv, norm_shared=s.norm, name=f"{name}_{i}")(
          h, modality, train
        )
      if pool:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))

    s = self.scheme.sharing(schemes.encoder(BOTTOM))
    for i in range(2):
      h = block(32 * w, conv_shared=s.conv, norm_shared=s.norm, dilation=2, name=f"dilated_{i}")(
        h, modality, train
      )

    for i in range(2):
      s = self.scheme.sharing(schemes.decoder(3 - i))
      h = layers.ModalityNorm(mods, s.norm, name=f"post_norm_{i}")(h, modality, train)
      h = layers.leaky_relu(h)
      h = conv(s.conv, features=32 * w, kernel_size=(3, 3), name=f"post_conv_{i}")(h, modality)
      h = drop(h)

    s = self.scheme.sharing(schemes.decoder(1))
    mirror = self.pad == "reference"
    channels = UPSAMPLE * UPSAMPLE * self.num_classes * self.upsample_mult
    h = conv(s.conv, features=channels, kernel_size=(3, 3), mirror=mirror, name="upsample_conv")(
      h, modality
    )
    h = layers.ModalityNorm(mods, s.norm, name="upsample_norm")(h, modality, train)
    h = depth_to_space(layers.leaky_relu(h), UPSAMPLE)
    return conv(
      s.conv,
      features=self.num_classes,
      kernel_size=(5, 5),
      use_bias=self.head_bias,
      mirror=mirror,
      name="head",
    )(h, modality)


def depth_to_space(x, block: int):
  """[B, H, W, b*b*C] -> [B, H*b, W*b, C], channel order as TensorFlow's depth_to_space."""
  b, hh, ww, c = x.shape
  out = c // (block * block)
  x = x.reshape(b, hh, ww, block, block, out)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hh * block, ww * block, out)
