"""ukd: one segmentation network for unpaired CT and MRI.

Implements Dou, Liu, Heng and Glocker, "Unpaired Multi-modal Segmentation via
Knowledge Distillation" (IEEE TMI 2020): convolution kernels shared by all
modalities, normalization layers per modality, and a knowledge-distillation loss
that aligns the modalities' class-wise prediction distributions.
"""

__version__ = "0.1.0"
