"""The latent-to-pixel lift at CPU scale (docs/latent_to_pixel.md), two configs in one file:

    --config=configs/lift_mnist.py:latent    the class-conditional latent flow model (stage b)
    --config=configs/lift_mnist.py           the AsymFlowVR + LPIPS finetune of the lifted model (stage e)

``python -m asymflow_jax.lift_demo --workdir=W`` runs every stage (autoencoder, latents, latent model,
Procrustes, lift, finetune, evaluation) and fills in the paths. The finetune alone, on a lifted
workdir and the cached dataset of images + latents that the demo wrote::

    python -m asymflow_jax.train --config=configs/lift_mnist.py:latent --workdir=W/latent \
        --config.data.path=W/latents.npz
    python -m asymflow_jax.train --config=configs/lift_mnist.py --workdir=W/finetune \
        --config.finetune.base=W/lifted --config.data.path=W/pixels_latents.npz

Sizes: digits 32x32x1; the autoencoder downsamples by 4 to 8x8x4 latents; the latent model uses
latent patch 2 (16 tokens of d = 16) and predicts the latent velocity (rank = d); the lifted pixel
model has patch 8 (16 tokens of D = 64) and a rank-16 Procrustes subspace. Same backbone widths as
configs/default.py. The finetune follows the AsymFLUX.2 recipe (spec section 8) scaled to a few
hundred steps: trainable input/output projections and final norm, LoRA on the feed-forward, the
time embedder and the attention output, output projection lr x10, clipping and karras EMA after the
warm-up, shift-17 sigma sampler, loss shift 0.3, MSE weight 5, LPIPS (VGG) weight 1, recovery
clamp 1e-4 at inference.
"""

from configs import common

LATENT_CHANNELS = 4
FACTOR = 4              # autoencoder downsampling
LATENT_PATCH = 2


def _backbone(input_size: int, patch_size: int, in_channels: int):
  return common.model_config("tiny", input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                             hidden_size=128, depth=4, num_heads=4, bottleneck_dim=16, in_context_len=4,
                             in_context_start=1, num_classes=10)


def latent_config():
  """Stage (b): velocity prediction (rank = d = 16, any full-rank basis) on cached latents."""
  c = common.base_config()
  c.data = common.mnist_data()
  c.data.source = "npz"         # latents.npz: image = the cached latents (float32), label
  c.data.image_size, c.data.num_channels = 32 // FACTOR, LATENT_CHANNELS
  c.model = _backbone(32 // FACTOR, LATENT_PATCH, LATENT_CHANNELS)
  c.model.rank = LATENT_PATCH ** 2 * LATENT_CHANNELS
  c.model.projected_init = False
  c.subspace.kind = "random"        # r = D: the basis only needs to span everything
  c.batch_size = 96
  c.num_steps = 700
  c.lr = 1e-3
  c.warmup_steps = 50
  c.ema_decays = (0.99,)
  c.log_every = 50
  c.checkpoint.every = 500
  c.sample.num_steps = 20
  c.sample.num_images = 100
  c.sample.guidance = 2.0
  c.sample.interval = (0.0, 1.0)
  c.eval.metric = "fdd"
  return c


def finetune_config():
  """Stage (e): AsymFlowVR + LPIPS finetune of the lifted pixel model (spec section 8)."""
  c = common.base_config()
  c.data = common.mnist_data()
  c.data.source = "npz"
  c.data.extra_keys = ("latent",)
  c.model = _backbone(32, LATENT_PATCH * FACTOR, 1)
  c.model.rank = LATENT_PATCH ** 2 * LATENT_CHANNELS
  c.model.projected_init = False
  c.objective = "asymflow_vr"
  c.vr.latent_patch_size = LATENT_PATCH
  c.sigma_mean, c.sigma_std, c.sigma_shift = 0.0, 1.0, 17.0
  c.prob_class = 0.9
  c.finetune.trainable = ("x_embedder", "final_layer")
  c.finetune.lr_mults = (("final_layer/linear", 10.0),)
  c.finetune.lora_rank = 8
  c.finetune.lora_dropout = 0.05
  c.finetune.lora_targets = ("mlp/w12", "mlp/w3", "t_embedder", "attn/proj")
  c.vr.lpips_samples = 8         # CPU budget: LPIPS (VGG16) on 8 of the 32 samples, an unbiased estimate
  c.batch_size = 32
  c.num_steps = 300
  c.lr = 2e-4
  c.warmup_steps = 20
  c.warmup_ratio = 1e-3
  c.grad_clip, c.grad_clip_start = 200.0, 20
  c.ema_decays, c.ema_policy, c.ema_start, c.ema_gamma = (0.0,), "karras", 20, 7.0
  c.log_every = 20
  c.checkpoint.every = 100
  c.sample.num_steps = 20
  c.sample.num_images = 100
  c.sample.guidance = 2.0
  c.sample.interval = (0.0, 1.0)
  c.sample.sigma_min = 1e-4
  c.eval.metric = "fdd"
  return c


def get_config(arg: str | None = None):
  tokens = [t for t in (arg or "").split(",") if t]
  if "latent" in tokens:
    tokens.remove("latent")
    return common.apply_arg(latent_config(), ",".join(tokens))
  return common.apply_arg(finetune_config(), ",".join(tokens))
