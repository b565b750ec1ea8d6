"""AsymFlow-L/16 on ImageNet 256, rank-8 PCA subspace: the paper's recipe (spec section 4).

JiT-L/16 (459M parameters; sizes from the JiT paper). LakonLab configures only H/16; L/16
uses the same recipe here (with the H/16 config's proj_dropout 0.2).

    python -m asymflow_jax.train --config=configs/imagenet256_l16.py --workdir=/mnt/gcs/asymflow_l16 \
        --config.data.data_dir=/path/to/tensorflow_datasets

The recipe (data, optimiser, EMA, precision, sampling) is common.imagenet256_config's.
"""

from configs import common


def get_config(arg: str | None = None):
  return common.imagenet256_config("L/16", arg, proj_dropout=0.2)
