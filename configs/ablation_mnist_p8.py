"""Rank ablation at CPU scale, in the regime the paper targets: patch dimension >> bottleneck.

The embedded default (configs/default.py): MNIST 32x32x1 with patch 8 (D = 64 per patch) into a
bottleneck of 16 (D / bottleneck = 4, like JiT-H/16's 768 / 256 = 3). Same network, data order,
seeds and budget for every run; only the subspace changes. The sweep (docs/ablation.md has the exact commands and results):

    launch/sweep.py --config=configs/ablation_mnist_p8.py --workdir=workdirs/ablation \
        --sweep 'model.rank=0,2,4,8' --sweep 'subspace.kind=pca'
    launch/sweep.py --config=configs/ablation_mnist_p8.py --workdir=workdirs/ablation \
        --sweep 'model.rank=4,8' --sweep 'subspace.kind=random'
    python -m asymflow_jax.train --config=configs/ablation_mnist_p8.py --workdir=workdirs/ablation/rank64_kind-pca \
        --config.model.rank=64 --config.model.projected_init=False     # r = D: velocity prediction

Quality: Frechet Digit Distance of 500 EMA samples every 200 steps (eval_fdd in metrics.jsonl).
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config(arg)   # patch 8, bottleneck 16, 800 steps: only the subspace changes per run
  c.sample.num_steps = 10
  c.eval.every = 200
  c.eval.metric = "fdd"
  c.eval.num_images = 500
  return c
