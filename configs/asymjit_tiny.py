"""The parity-fixture architecture (JiT "tiny": input 32, patch 4, 3 channels, hidden 64, depth 4,
rank 4) on the embedded digits replicated to RGB.

The reference fixture ``tests/fixtures/jit_tiny.npz`` converts into a workdir with it::

    python -m asymflow_jax.convert --from=pytorch --checkpoint=asymjit_tiny.safetensors \
        --config=configs/asymjit_tiny.py --workdir=workdirs/tiny_converted
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data = common.mnist_data()
  c.data.num_channels = 3
  c.model = common.model_config("tiny", in_channels=3)
  c.model.rank = 4
  c.batch_size = 16
  c.num_steps = 100
  c.lr = 1e-4
  c.warmup_steps = 10
  c.ema_decays = (0.99,)
  c.log_every = 10
  c.checkpoint.every = 50
  c.sample.num_steps = 4
  c.sample.num_images = 10
  c.sample.guidance = 2.0
  c.sample.interval = (0.0, 1.0)
  c.subspace.num_images = 500
  c.eval.metric = "fdd"
  c.eval.num_images = 100
  return common.apply_arg(c, arg)
