"""Rank ablation at CPU scale, in the regime the paper targets: patch dimension >> bottleneck.

MNIST 32x32x1 with patch 8 (D = 64 per patch) into a bottleneck of 16 (D / bottleneck = 4, like
JiT-H/16's 768 / 256 = 3). Same network, data order, seeds and budget for every run; only the
subspace changes. The sweep (docs/ablation.md has the exact commands and results):

    launch/sweep.py --config=configs/ablation_mnist_p8.py --workdir=workdirs/ablation \
        --sweep 'model.rank=0,2,4,8' --sweep 'subspace.kind=pca'
    launch/sweep.py --config=configs/ablation_mnist_p8.py --workdir=workdirs/ablation \
        --sweep 'model.rank=4,8' --sweep 'subspace.kind=random'
    python -m asymflow_jax.train --config=configs/ablation_mnist_p8.py --workdir=workdirs/ablation/rank64_kind-pca \
        --config.model.rank=64 --config.model.projected_init=False     # r = D: velocity prediction

Quality: Frechet Digit Distance of 500 EMA samples every 200 steps (eval_fdd in metrics.jsonl).
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
  c.num_steps = 800
  c.lr = 1e-3
  c.warmup_steps = 100
  c.ema_decays = (0.99,)
  c.log_every = 50
  c.checkpoint.every = 800
  c.subspace.num_images = 5000
  c.sample.num_steps = 10
  c.sample.num_images = 100
  c.sample.guidance = 2.0
  c.sample.interval = (0.0, 1.0)
  c.eval.every = 200
  c.eval.metric = "fdd"
  c.eval.num_images = 500
  return common.apply_arg(c, arg)
