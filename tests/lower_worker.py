"""Lowers pod train steps on an 8-device fake mesh without running them: the ImageNet H/16 + REPA step
(DINOv2-B encoder inside) and the AsymFLUX.2 klein 9B finetuning step (abstract inputs, nothing allocated).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/lower_worker.py OUT.json [h16] [asymflux2]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from asymflow_jax import experiment, objective, sharding  # noqa: E402
from configs import asymflux2_klein, imagenet256_h16_repa  # noqa: E402


def _spec(tree, *names):
  for n in names:
    tree = tree[n]
  return str(tree.spec)


def _count(tree):
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def h16():
  config = imagenet256_h16_repa.get_config()
  config.repa.encoder_path = "unused"   # nothing is read when lowering
  exp = experiment.build(config, sharding.make_mesh(config.mesh), training=True)
  lowered, shardings = objective.lower_train_step(exp), exp.shardings
  params = shardings.params
  text = lowered.as_text()
  encoder = exp.abstract.frozen[experiment.REPA_ENCODER]
  return dict(
      projector_params=_count(exp.abstract.params[experiment.REPA_PROJECTOR]),
      projector_spec=_spec(params, experiment.REPA_PROJECTOR, "linear_1", "kernel"),
      encoder_params=_count(encoder),
      encoder_dtypes=sorted({str(x.dtype) for x in jax.tree.leaves(encoder)}),
      encoder_qkv_spec=_spec(shardings.frozen[experiment.REPA_ENCODER], "encoder", "layer", "attention", "attention",
                             "query", "kernel"),
      has_dinov2_input="tensor<16x224x224x3xbf16>" in text or "224x224x3" in text,
      devices=jax.device_count(),
      qkv_spec=str(params["blocks_0"]["attn"]["qkv"]["kernel"].spec),
      opt_specs={jax.tree_util.keystr(k): str(v.spec) for k, v in jax.tree_util.tree_leaves_with_path(
          shardings.opt_state) if "blocks_0']['attn']['qkv']['kernel" in jax.tree_util.keystr(k)
          or "count" in jax.tree_util.keystr(k)},
      num_params=_count(experiment.model_params(exp.abstract.params)),
      has_bf16="bf16" in text,
      num_blocks=sum(1 for k in params if k.startswith("blocks_")),
  )


def asymflux2():
  config = asymflux2_klein.get_config("cpu-8")
  config.finetune.base, config.data.path = "unused", "unused"   # nothing is read when lowering
  exp = experiment.build(config, sharding.make_mesh(config.mesh), training=True)
  text = objective.lower_train_step(exp).as_text()
  sh = exp.shardings
  return dict(
      frozen_params=int(sum(x.size for x in jax.tree.leaves(exp.abstract.frozen["params"]))),
      trained_params=int(sum(x.size for x in jax.tree.leaves(exp.abstract.params))),
      trained=sorted(exp.abstract.params),
      to_q_spec=_spec(sh.frozen["params"], "transformer_blocks", "attn", "to_q", "kernel"),
      lora_a_spec=_spec(sh.params, "lora", "transformer_blocks", "ff", "linear_in", "a"),
      lora_b_spec=_spec(sh.params, "lora", "transformer_blocks", "ff", "linear_in", "b"),
      proj_out_spec=_spec(sh.params, "proj_out", "kernel"),
      has_bf16="bf16" in text,
      has_while="stablehlo.while" in text,
  )


def main():
  targets = sys.argv[2:] or ["h16"]
  out = {t: globals()[t]() for t in targets}
  with open(sys.argv[1], "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main()
