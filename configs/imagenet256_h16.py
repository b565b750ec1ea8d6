"""AsymFlow-H/16 on ImageNet 256, rank-8 PCA subspace: the paper's recipe (spec section 4).

The LakonLab ImageNet config (JiT-H/16: hidden 1280, depth 32, 953M parameters).

    python -m asymflow_jax.train --config=configs/imagenet256_h16.py --workdir=/mnt/gcs/asymflow_h16 \
        --config.data.data_dir=/path/to/tensorflow_datasets

The recipe (data, optimiser, EMA, precision, sampling) is common.imagenet256_config's.
"""

from configs import common


def get_config(arg: str | None = None):
  return common.imagenet256_config("H/16", arg)
