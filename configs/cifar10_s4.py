"""Research size: a small AsymFlow on CIFAR-10 32x32 (patch 4, D = 48, bottleneck 32, rank 4).

    python -m asymflow_jax.train --config=configs/cifar10_s4.py --workdir=DIR --config.data.data_dir=...

Needs TFDS cifar10 prepared in array_record format (nothing is downloaded at run time).
"""

from configs import common
from asymflow_jax.data.pipeline import tfds_data_config


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data = tfds_data_config("cifar10", image_size=32, num_classes=10)
  c.model = common.model_config("B/16", input_size=32, patch_size=4, hidden_size=384, depth=12, num_heads=6,
                                bottleneck_dim=32, in_context_len=8, in_context_start=3, num_classes=10,
                                proj_dropout=0.1)
  c.model.rank = 4
  c.batch_size = 256
  c.num_steps = 200_000
  c.warmup_steps = 2000
  c.ema_decays = (0.9999, 0.999)
  c.sample.guidance = 1.5
  c.sample.interval = (0.0, 1.0)
  return common.apply_arg(c, arg)
