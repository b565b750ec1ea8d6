"""AsymFLUX.2 klein: FLUX.2 klein base 9B lifted to 16x16 pixel patches (Oklab) and finetuned with
AsymFlowVR + LPIPS on text-image pairs (spec section 8; LakonLab ``asymflux2_klein_32gpus.py``).

    # 1. the pixel base: import the diffusers transformer and lift it through the Procrustes subspace
    python -m asymflow_jax.lift_flux2 --transformer=/ckpt/FLUX.2-klein-base-9B/transformer \
        --subspace=/data/procrustes_p16.npz --workdir=/ckpt/asymflux2_base --config=configs/asymflux2_klein.py
    # 2. the finetuning data: images + captions -> cached latents and prompt embeddings
    python -m asymflow_jax.data.t2i_prep --images=/data/pairs --out=/data/t2i_1024 --resolution=1024,1024 \
        --encoder_path=/ckpt/FLUX.2-klein-base-9B
    # 3. finetune on a pod
    python -m asymflow_jax.train --config=configs/asymflux2_klein.py:v5p-128 --workdir=/ckpt/asymflux2 \
        --config.finetune.base=/ckpt/asymflux2_base --config.data.path=/data/t2i_1024

The recipe: trainable x_embedder, proj_out, norm_out + LoRA rank 256 (dropout 0.05) on the
double blocks' ff / ff_context linear_in/out, the time embedder's linears and the single blocks'
attn.to_out; AdamW lr 1e-4 (proj_out x10), betas (0.9, 0.95), wd 0; clip 200 from step 100; linear
warm-up 100 steps (ratio 1e-3); 15k steps at batch 256 (8 per GPU x 32); karras EMA (gamma 7) from
step 100; sigma = shift-17 warp of sigmoid(N(0, 1)); loss shift 0.3, MSE weight 5, LPIPS (VGG)
weight 1; bf16 compute, remat. Sampling: UniPC 32 steps, CFG 4.0 with orthogonal guidance 1.0, the
sqrt dynamic shift (17 at 1024^2 px), denoised clamp, recovery clamp 1e-4.

Differences from the reference (see docs/asymflux2.md): fixed resolution instead of aspect-ratio
buckets; fp32 AdamW moments instead of AdamW8bit; the frozen base is kept in the parameter dtype
(float32) rather than bf16 (sharded over the mesh, see launch/README.md for the memory table).
"""

from __future__ import annotations

import ml_collections

from asymflow_jax import config as config_lib
from asymflow_jax.data import pipeline
from asymflow_jax.models import flux2

LORA_TARGETS = ("ff/linear_in", "ff/linear_out", "ff_context/linear_in", "ff_context/linear_out",
                "timestep_embedder/linear_1", "timestep_embedder/linear_2", "single_transformer_blocks/attn/to_out")

# (data, fsdp, tensor) per slice; the batch 256 is split over data x fsdp.
MESH_RECIPES = {
    # v5p slice names count TensorCores, two per chip, and JAX sees one (megacore) device per chip
    "v5p-128": (1, 64, 1),    # 64 chips, 95 GiB HBM each: 4 images per chip (53.5 GiB peak, AOT-compiled)
    # 32 chips, 8 images per chip, LPIPS in 8 slices (one image per chip at a time): 74.6 GiB per chip
    # AOT-compiled, 31.1 GiB with --config.model.attention_impl=splash (all at once: 105.5 GiB, set by
    # LPIPS's VGG16 at 1024^2; launch/README.md)
    "v5p-64": (1, 32, 1),
    "h100x32": (4, 8, 1),     # 4 nodes x 8 H100 (80 GB): FSDP inside a node, data across nodes; cuDNN flash attention
    "cpu-8": (1, 8, 1),       # the fake 8-device CPU mesh of the lowering test
}


def asymflux2_config(latent: flux2.Flux2Config | None = None, input_size: int = 1024) -> ml_collections.ConfigDict:
  """The recipe for ``latent`` (default FLUX.2 klein base 9B) at ``input_size``^2 pixels."""
  c = config_lib.base_config()
  c.model = config_lib.asymflux2_model_config(input_size, latent=latent, dtype="bfloat16", remat=True)
  c.data = pipeline.t2i_data_config("", extra_keys=("latents",), image_size=input_size)
  c.subspace.kind = "random"      # unused when finetuning: the base workdir holds U and s
  c.batch_size = 256
  c.num_steps = 15_000
  c.prob_class = 1.0              # no caption dropout
  c.objective = "asymflow_vr"
  c.sigma_mean, c.sigma_std, c.sigma_shift = 0.0, 1.0, 17.0
  c.loss_sigma_min = 0.05
  c.vr.latent_key, c.vr.latent_patch_size = "latents", 1   # cached tokens are already 2x2 latent patches
  c.vr.loss_shift, c.vr.mse_weight, c.vr.lpips_weight = 0.3, 5.0, 1.0
  c.vr.teacher_sigma_min = 1e-4
  c.lr, c.b1, c.b2, c.weight_decay = 1e-4, 0.9, 0.95, 0.0
  c.warmup_steps, c.warmup_ratio = 100, 1e-3
  c.grad_clip, c.grad_clip_start = 200.0, 100
  c.ema_decays, c.ema_policy, c.ema_start, c.ema_gamma = (0.0,), "karras", 100, 7.0
  c.finetune.trainable = ("x_embedder", "proj_out", "norm_out")
  c.finetune.lr_mults = (("proj_out", 10.0),)
  c.finetune.lora_rank, c.finetune.lora_dropout = 256, 0.05
  c.finetune.lora_targets = LORA_TARGETS
  c.checkpoint.every, c.checkpoint.keep, c.checkpoint.keep_every = 250, 1, 1000
  c.log_every = 10
  c.sample.method, c.sample.num_steps, c.sample.guidance, c.sample.orthogonal = "unipc", 32, 4.0, 1.0
  c.sample.sigma_min, c.sample.shift, c.sample.clamp_denoised = 1e-4, 0.0, True
  c.sample.interval = (0.0, 1.0)
  c.sample.num_images = 8
  c.eval.every = 0
  return c


def get_config(arg: str | None = None):
  """``:<mesh recipe>`` picks a mesh from :data:`MESH_RECIPES` (default: FSDP over all devices)."""
  c = asymflux2_config()
  for token in filter(None, (arg or "").split(",")):
    if token not in MESH_RECIPES:
      raise ValueError(f"unknown config argument {token!r}; expected one of {sorted(MESH_RECIPES)}.")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = MESH_RECIPES[token]
    if token.startswith("h100"):
      c.model.attention_impl = "dot_product_attention"   # 8 images x 4608 tokens per GPU need the fused kernel
    if token == "v5p-64":
      c.vr.lpips_chunks = 8
  return c
