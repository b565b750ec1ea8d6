"""One interface over the project's AsymFlow backbones, chosen by ``config.model.family``:

* ``jit``        AsymJiT (class-conditional, spec section 3): condition = labels (B,) int32.
* ``asymflux2``  AsymFLUX.2 (text-to-image, spec section 8): condition = prompt embeddings (B, L, D_text).

Everything above the model layer (experiment, objective, sampling) goes through these functions, so
a training run, its checkpoints and its sharding rules are the same code for both.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn

from asymflow_jax.models import asymflux2, asymjit, flux2, jit_model

FAMILIES = ("jit", "asymflux2")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def from_config(m):
  """The backbone module of a ``config.model`` section."""
  if m.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {m.dtype!r}.")
  family = m.get("family", "jit")
  if family == "asymflux2":
    latent = flux2.Flux2Config.from_dict(dict(m.flux2))
    cfg = asymflux2.pixel_flux2_config(latent, m.patch_size, m.in_channels)
    return flux2.Flux2Transformer(cfg, dtype=DTYPES[m.dtype], remat=m.remat, remat_policy=m.remat_policy,
                                  attention_impl=m.get("attention_impl", "einsum"))
  if family != "jit":
    raise ValueError(f"config.model.family must be one of {FAMILIES}, got {family!r}.")
  cfg = jit_model.JiTConfig(**{f.name: m[f.name] for f in dataclasses.fields(jit_model.JiTConfig)})
  return jit_model.JiT(cfg, dtype=DTYPES[m.dtype], remat=m.remat, remat_policy=m.remat_policy,
                       attention_impl=m.get("attention_impl", "einsum"), scan_layers=m.get("scan_layers", False))


def is_text(model) -> bool:
  """True for text-conditioned backbones (condition = prompt embeddings)."""
  return isinstance(model, flux2.Flux2Transformer)


def patch_dim(model) -> int:
  """D = p*p*C, the pixel token width the basis rows index."""
  return model.config.in_channels if is_text(model) else model.config.patch_dim


def init_params(model, key, basis=None):
  """Unboxed initial parameters; AsymJiT writes ``basis`` into its bottleneck when given (projected init)."""
  if is_text(model):
    return asymflux2.init_params(model, key)
  return asymjit.init_params(model, key, basis)


def _boxed_abstract_params(model):
  return flux2.abstract_params(model) if is_text(model) else jit_model.abstract_params(model)


def abstract_params(model):
  """Unboxed parameter ShapeDtypeStructs (nothing allocated)."""
  return nn.meta.unbox(_boxed_abstract_params(model))


def param_specs(model):
  """Logical PartitionSpecs (tree like the params)."""
  return nn.get_partition_spec(_boxed_abstract_params(model))


def abstract_params_and_specs(model):
  """(:func:`abstract_params`, :func:`param_specs`) from one abstract init (one trace of the model)."""
  boxed = _boxed_abstract_params(model)
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def velocity(model, params, x_t, sigma, cond, basis, *, scale=1.0, sigma_min: float, train: bool = False,
             rngs=None, lora=None, features_after: int | None = None):
  """The AsymFlow velocity (B, H, W, C) float32 of either backbone; ``cond`` as in the module docstring.
  ``features_after=k`` (AsymJiT only): returns (velocity, image-token hidden state after block k)."""
  if is_text(model):
    if features_after is not None:
      raise ValueError("REPA features (features_after) exist only for the 'jit' family.")
    return asymflux2.asymflux2_apply(model, params, x_t, sigma, cond, basis, scale=scale, sigma_min=sigma_min,
                                     rngs=rngs, lora=lora)
  return asymjit.asymjit_apply(model, params, x_t, sigma, cond, basis, scale=scale, sigma_min=sigma_min,
                               train=train, rngs=rngs, lora=lora, features_after=features_after)


def condition(model, batch, key, prob_keep: float):
  """The training condition of a batch: labels kept with ``prob_keep`` (else the null class), or the
  prompt embeddings (text models train without caption dropout, as the reference recipe;
  ``prob_keep`` must then be 1)."""
  if is_text(model):
    if prob_keep < 1:
      raise ValueError(f"prob_class={prob_keep}: caption dropout is not supported for text-to-image backbones "
                       "(the AsymFLUX.2 recipe trains without it); set config.prob_class=1.0.")
    return batch["prompt_embeds"]
  labels = batch["label"]
  keep = jax.random.bernoulli(key, prob_keep, labels.shape)
  return jnp.where(keep, labels, model.config.num_classes)
