"""Sample images from a workdir (trained or converted): EMA weights by default.

    python -m asymflow_jax.sample --workdir=workdirs/demo --num=100 --guidance=2.0 [--steps=50 --method=heun]
    python -m asymflow_jax.sample --workdir=W --embeddings=prompts.npz [--prompts=prompts.txt]   # AsymFLUX.2
    python -m asymflow_jax.sample --workdir=W --t2i_data=DATASET --num=8                        # its prompts

Writes ``OUT.png`` (a grid) and ``OUT.npz`` (uint8 images (N, H, W, C) and labels). Sample i uses
the noise ``fold_in(key(seed), i)`` and label ``i % num_classes``, so the images do not depend on
the number of devices or hosts, nor on the batch size. Only the chosen weights and the subspace
are read from the checkpoint (never the optimizer state).

Text-to-image workdirs (``model.family='asymflux2'``) take cached prompt embeddings: an ``.npz``
with ``prompt_embeds`` (N, L, D) and ``empty_prompt_embeds`` (L, D) (the CFG negative), or the
first ``--num`` records of a t2i dataset (``python -m asymflow_jax.data.t2i_prep`` writes both the
embeddings and the empty prompt with the FLUX.2 klein text encoder, an optional extra). One PNG per
prompt is written next to the grid, ``OUT_<i>.png``; ``--prompts`` (one per line) are stored in the
npz with the images. Sampler: UniPC with the config's steps, guidance, orthogonal weight and shift.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import jax
from etils import epath

from asymflow_jax import checkpoint
from asymflow_jax import cli
from asymflow_jax import distributed
from asymflow_jax import image_io
from asymflow_jax import sampling
from asymflow_jax import t2i_sampling
from asymflow_jax.data import t2i
from asymflow_jax.models import backbone


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.sample", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--num", type=int, default=100)
  parser.add_argument("--out", default=None, help="output prefix (default WORKDIR/samples/sample_STEP)")
  parser.add_argument("--embeddings", default=None, help="text-to-image: .npz with prompt_embeds, empty_prompt_embeds")
  parser.add_argument("--t2i_data", default=None, help="text-to-image: a t2i dataset whose first --num prompts to use")
  parser.add_argument("--prompts", default=None, help="text-to-image: the prompts (one per line), stored with the images")
  cli.add_sampler_args(parser)
  args = parser.parse_args(argv)
  cli.check_sampler_args(parser, args)
  distributed.initialize()  # multi-host: auto-detected (TPU pod, SLURM, JAX_* env); else a no-op

  if args.embeddings and args.t2i_data:
    parser.error("give --embeddings or --t2i_data, not both.")
  try:
    _, exp, state, settings = cli.open_for_sampling(parser, args, args.step)
    if backbone.is_text(exp.model):
      return _text_to_image(args, exp, state, settings)
    if args.embeddings or args.t2i_data or args.prompts:
      raise ValueError("--embeddings / --t2i_data / --prompts are for text-to-image workdirs (model.family="
                       f"'asymflux2'); {args.workdir} is {exp.config.model.get('family', 'jit')!r}.")
    images = sampling.generate_from_config(exp.model, state.params, state.basis, state.scale, exp.mesh,
                                           sample_config=settings, num=args.num, seed=args.seed, batch=args.batch,
                                           progress=True,
                                           color_space=exp.config.model.color_space)
  except (ValueError, FileNotFoundError, FloatingPointError, checkpoint.CheckpointError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  labels = (np.arange(args.num) % exp.model.config.num_classes).astype(np.int32)
  out = args.out or str(epath.Path(args.workdir) / "samples" / f"sample_{int(state.step):07d}")
  if jax.process_index() == 0:
    image_io.save_npz(out + ".npz", images=images, labels=labels)
    cols = exp.model.config.num_classes if args.num % exp.model.config.num_classes == 0 else None
    image_io.save_png(out + ".png", images, cols=cols, upscale=max(1, 128 // exp.model.config.input_size))
    print(f"wrote {out}.png and {out}.npz ({args.num} images, step {int(state.step)})")
  return 0


def _load_prompts(args):
  """(prompt_embeds (N, L, D), empty (L, D), prompt strings or None) from the CLI arguments."""
  prompts = None
  if args.prompts:
    prompts = [line.rstrip("\n") for line in open(args.prompts, encoding="utf-8") if line.strip()]
  if args.embeddings:
    with np.load(args.embeddings) as z:
      missing = [k for k in ("prompt_embeds", "empty_prompt_embeds") if k not in z]
      if missing:
        raise ValueError(f"--embeddings={args.embeddings!r} has no {missing}; it has {sorted(z.files)}.")
      embeds, empty = np.asarray(z["prompt_embeds"], np.float32), np.asarray(z["empty_prompt_embeds"], np.float32)
  elif args.t2i_data:
    source = t2i.T2ISource(args.t2i_data)
    embeds = np.stack([source[i]["prompt_embeds"] for i in range(min(args.num, len(source)))]).astype(np.float32)
    empty = np.asarray(source.empty_prompt_embeds, np.float32)
    prompts = prompts or [source[i]["caption"] for i in range(len(embeds))]
  else:
    raise ValueError("a text-to-image workdir needs --embeddings=NPZ or --t2i_data=DATASET (cached prompt embeddings).")
  if embeds.ndim != 3 or empty.shape != embeds.shape[1:]:
    raise ValueError(f"prompt_embeds {embeds.shape} and empty_prompt_embeds {empty.shape}: expected (N, L, D) and (L, D).")
  if prompts is not None and len(prompts) != len(embeds):
    raise ValueError(f"--prompts has {len(prompts)} prompts but there are {len(embeds)} embeddings.")
  return embeds, empty, prompts


def _text_to_image(args, exp, state, settings) -> int:
  embeds, empty, prompts = _load_prompts(args)
  d_text = exp.model.config.joint_attention_dim
  if embeds.shape[-1] != d_text:
    raise ValueError(f"prompt embeddings have width {embeds.shape[-1]}; the model's context embedder reads {d_text}.")
  size = exp.config.model.input_size
  images = np.concatenate([
      t2i_sampling.generate_t2i(exp.model, state.params, state.basis, state.scale, embeds[i:i + args.batch], empty,
                                sample_config=settings, seed=args.seed, height=size, width=size, start=i,
                                color_space=exp.config.model.color_space)
      for i in range(0, len(embeds), args.batch)])
  out = args.out or str(epath.Path(args.workdir) / "samples" / f"t2i_{int(state.step):07d}")
  if jax.process_index() == 0:
    image_io.save_npz(out + ".npz", images=images, prompts=np.asarray(prompts if prompts else [""] * len(images)))
    image_io.save_png(out + ".png", images)
    for i, img in enumerate(images):
      image_io.save_png(f"{out}_{i}.png", img[None])
    print(f"wrote {out}.png, {out}_<i>.png and {out}.npz ({len(images)} images, step {int(state.step)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
