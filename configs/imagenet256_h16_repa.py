"""AsymFlow-H/16 + REPA on ImageNet 256: the paper's best recipe (1.57 FID; spec section 5).

configs/imagenet256_h16.py plus representation alignment: the hidden state after block 7 (the 8th
block, before the in-context tokens enter at block 10) goes through a 3-layer SiLU projector
(1280 -> 2048 -> 2048 -> 768) and is aligned, with weight 0.5, to the patch tokens of a frozen
DINOv2-B/14 (bfloat16) that sees the clean images resized to 224 px. Sampling guidance 2.2.

The encoder weights are read from a local transformers checkpoint folder (nothing is downloaded):

    python -m asymflow_jax.train --config=configs/imagenet256_h16_repa.py:v5p-64 --workdir=/mnt/gcs/asymflow_h16_repa \
        --config.data.data_dir=/path/to/tensorflow_datasets --config.repa.encoder_path=/path/to/dinov2-base
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.imagenet256_config("H/16", arg)
  c.repa.weight = 0.5
  c.repa.block = 7
  c.repa.projector_dim = 2048
  c.repa.encoder = "dinov2_base"
  c.repa.encoder_dtype = "bfloat16"
  c.sample.guidance = 2.2
  return c
