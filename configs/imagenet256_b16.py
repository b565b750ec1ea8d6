"""AsymFlow-B/16 on ImageNet 256, rank-8 PCA subspace: the paper's recipe (spec section 4).

JiT-B/16 (131M parameters). LakonLab configures only H/16; B/16 uses the same recipe here
(with the H/16 config's proj_dropout 0.2).

    python -m asymflow_jax.train --config=configs/imagenet256_b16.py --workdir=/mnt/gcs/asymflow_b16 \
        --config.data.data_dir=/path/to/tensorflow_datasets

The workdir is a filesystem path shared by all hosts (e.g. a bucket mounted with gcsfuse).
Data: TFDS imagenet2012 prepared in array_record format (ADM centre crop 256, random flip).
AdamW lr 2e-4, betas (0.9, 0.95), wd 0, 5-epoch linear warm-up (6255 it), batch 1024, 750,600
iterations; EMA 0.9999; bf16 compute, fp32 master weights and attention, remat. Sampling: Heun 50
steps, CFG 2.3 on sigma in [0, 0.88], EMA weights.
"""

from configs import common


def get_config(arg: str | None = None):
  return common.imagenet256_config("B/16", arg, proj_dropout=0.2)
