"""Research size: AsymFlow-B/8 on ImageNet 64x64, rank 8 (D = 192 per patch, bottleneck 64).

The regime the paper targets (patch dimension large relative to the bottleneck) at 1/16 of the
ImageNet-256 token cost: 64 tokens per image.

    python -m asymflow_jax.train --config=configs/imagenet64_b8.py --workdir=DIR --config.data.data_dir=...
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data = common.imagenet_data(64)
  c.model = common.model_config("B/16", input_size=64, patch_size=8, bottleneck_dim=64, in_context_len=16,
                                proj_dropout=0.1)
  c.model.rank = 8
  c.model.dtype = "bfloat16"
  c.batch_size = 512
  c.num_steps = 400_000
  return common.apply_arg(c, arg)
