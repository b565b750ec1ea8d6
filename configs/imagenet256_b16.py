"""AsymFlow-B/16 on ImageNet 256, rank 8 PCA subspace: the paper's recipe (spec section 4).
JiT-B/16 (131M parameters). LakonLab configures only H/16; B/16 uses the same recipe here
(with the H/16 config's proj_dropout 0.2 as in the ImageNet config).

    python -m asymflow_jax.train --config=configs/imagenet256_b16.py --workdir=/mnt/gcs/asymflow_b16 \
        --config.data.data_dir=/path/to/tensorflow_datasets

The workdir is a filesystem path (mount a bucket with gcsfuse on every host).
Data: TFDS imagenet2012 prepared in array_record format (ADM centre crop 256, random flip).
Optimiser: AdamW lr 2e-4, betas (0.9, 0.95), wd 0, 5-epoch linear warm-up (6255 it), batch 1024,
750,600 iterations (600 epochs); EMA 0.9999 from iteration 0; bf16 compute with fp32 master
weights, attention in fp32, remat. Sampling: Heun 50 steps, CFG 2.3 on sigma in [0, 0.88], EMA weights.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data = common.imagenet_data(256)
  c.model = common.model_config("B/16", proj_dropout=0.2)
  c.model.rank = 8
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.subspace.num_images = 10_000
  c.subspace.seed = 2021
  return common.apply_arg(c, arg)
