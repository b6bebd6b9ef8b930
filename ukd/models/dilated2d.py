"""The paper's 2D cardiac network: pre-activation residual blocks, dilation, 8x depth-to-space.

Layout (base width w = 16 in the paper, C classes):
  stem 3x3 conv to w;
  residual stages of widths w | 2w | 4w,4w | 8w,8w | 16w,16w | 16w,16w | 32w,32w
  with a 2x2 max-pool after each of the first three stages;
  two dilated (rate 2) residual blocks at 32w; two BN-LReLU-conv layers at 32w;
  a 3x3 conv to 8*8*C*k channels (+BN+LReLU, k = 8 in the paper); 8x depth-to-space;
  a 5x5 conv to C logits.
Each residual block is two BN -> leaky ReLU -> 3x3 conv -> dropout layers with a
zero-padding shortcut where the width grows; the two layers after the dilated
blocks end in dropout too, as in the reference code.  Kernels start from the
reference's truncated normal (std 0.01) unless `init='lecun'`.  One difference
from the reference is kept: its last two convolutions pad symmetrically (mirror),
these pad with zeros like every other layer.  At w = 16, C = 5 the kernels hold
39,302,456 weights.
"""

import functools

import flax.linen as nn

from ukd.models import layers
from ukd.models.schemes import Scheme

# (stage name, widths of its residual blocks in units of the base width, max-pool after it).
RESIDUAL_STAGES = (
  ("stage1", (1,), True),
  ("stage2", (2,), True),
  ("stage3", (4, 4), True),
  ("stage4", (8, 8), False),
  ("stage5", (16, 16), False),
  ("stage6", (16, 16), False),
  ("stage7", (32, 32), False),
)
UPSAMPLE = 8  # three 2x2 pools, undone by one 8x depth-to-space


class ResidualBlock(nn.Module):
  """Pre-activation residual block; parameters shared or per modality as `sharing` says."""

  features: int
  modalities: tuple[str, ...]
  conv_shared: bool
  norm_shared: bool
  dropout: float
  kernel_init: str
  dtype: str
  conv_grads: str
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
        conv_grads=self.conv_grads,
      )(h, modality)
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
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
  kernel_init: str = "reference"
  dtype: str = "float32"  # convolutions' computation dtype (bfloat16: mixed precision)
  conv_grads: str = "xla"  # convolutions' gradients: a key of layers.CONV_GRADS

  @nn.compact
  def __call__(self, x, modality, train: bool = False):
    if x.ndim != 4 or x.shape[1] % UPSAMPLE or x.shape[2] % UPSAMPLE:
      raise ValueError(
        f"dilated2d expects [B, H, W, 3] with H and W divisible by {UPSAMPLE}; got {x.shape}"
      )
    w, mods = self.width, self.modalities
    drop = lambda h: nn.Dropout(self.dropout, deterministic=not train)(h)
    # Every convolution: this network's modalities, initialiser, compute dtype and gradients.
    conv = functools.partial(
      layers.ModalityConv,
      mods,
      kernel_init=self.kernel_init,
      dtype=self.dtype,
      conv_grads=self.conv_grads,
    )
    block = functools.partial(
      ResidualBlock,
      modalities=mods,
      dropout=self.dropout,
      kernel_init=self.kernel_init,
      dtype=self.dtype,
      conv_grads=self.conv_grads,
    )
    enc = self.scheme.sharing(("first", "encoder"))
    h = conv(enc.conv, features=w, kernel_size=(3, 3), name="stem")(x, modality)

    for name, widths, pool in RESIDUAL_STAGES:
      s = self.scheme.sharing(("encoder",))
      for i, k in enumerate(widths):
        h = block(k * w, conv_shared=s.conv, norm_shared=s.norm, name=f"{name}_{i}")(
          h, modality, train
        )
      if pool:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))

    s = self.scheme.sharing(("encoder",))
    for i in range(2):
      h = block(32 * w, conv_shared=s.conv, norm_shared=s.norm, dilation=2, name=f"dilated_{i}")(
        h, modality, train
      )

    d = self.scheme.sharing(("decoder",))
    for i in range(2):
      h = layers.ModalityNorm(mods, d.norm, name=f"post_norm_{i}")(h, modality, train)
      h = layers.leaky_relu(h)
      h = conv(d.conv, features=32 * w, kernel_size=(3, 3), name=f"post_conv_{i}")(h, modality)
      h = drop(h)

    channels = UPSAMPLE * UPSAMPLE * self.num_classes * self.upsample_mult
    h = conv(d.conv, features=channels, kernel_size=(3, 3), name="upsample_conv")(h, modality)
    h = layers.ModalityNorm(mods, d.norm, name="upsample_norm")(h, modality, train)
    h = depth_to_space(layers.leaky_relu(h), UPSAMPLE)

    last = self.scheme.sharing(("last", "decoder"))
    return conv(
      last.conv, features=self.num_classes, kernel_size=(5, 5), use_bias=True, name="head"
    )(h, modality)


def depth_to_space(x, block: int):
  """[B, H, W, b*b*C] -> [B, H*b, W*b, C], channel order as TensorFlow's depth_to_space."""
  b, hh, ww, c = x.shape
  out = c // (block * block)
  x = x.reshape(b, hh, ww, block, block, out)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, hh * block, ww * block, out)
