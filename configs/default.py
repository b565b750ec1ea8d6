"""The embedded default: class-conditional AsymFlow on the 5000 MNIST digits, minutes on a CPU.

    python -m asymflow_jax.train --config=configs/default.py --workdir=workdirs/default
    python -m asymflow_jax.train --config=configs/default.py --config.model.rank=0   # JiT x0-prediction

32x32x1 digits, patch 8 (D = 64 per patch) into a bottleneck of 16 -- the regime the paper
targets (JiT-H/16: 768 into 256) -- and a rank-4 PCA subspace computed on the first run and cached
in the workdir (rank 4 was the best of the CPU rank ablation, docs/ablation.md). All training
hyperparameters follow the ImageNet recipe (spec section 4) except the size, batch, learning
rate, warm-up, EMA and number of steps.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.data = common.mnist_data()
  c.model = common.model_config(
      "tiny", input_size=32, patch_size=8, in_channels=1, hidden_size=128, depth=4, num_heads=4,
      bottleneck_dim=16, in_context_len=4, in_context_start=1, num_classes=10)
  c.model.rank = 4
  c.batch_size = 128
  c.num_steps = 800             # ~4 minutes on 2 CPU cores: recognisable digits
  c.lr = 1e-3
  c.warmup_steps = 100
  c.ema_decays = (0.99,)        # short run: a long EMA would still hold the initial weights
  c.log_every = 25
  # 5 steps per device call: on 2 CPU cores the step at batch 128 takes ~155 instead of ~190 ms
  # (XLA:CPU faults its temporary buffer in once per call; bench/README.md)
  c.steps_per_call = 5
  c.checkpoint.every = 400
  c.sample.every = 0
  c.sample.num_steps = 20
  c.sample.num_images = 100     # 10 per class, one class per column
  c.sample.guidance = 2.0
  c.sample.interval = (0.0, 1.0)
  c.subspace.num_images = 5000
  c.eval.metric = "fdd"
  c.eval.num_images = 500
  return common.apply_arg(c, arg)
