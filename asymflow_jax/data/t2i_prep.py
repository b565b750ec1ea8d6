r"""Writes a text-to-image dataset (format: :mod:`asymflow_jax.data.t2i`) from image + caption pairs.

Usage::

    python -m asymflow_jax.data.t2i_prep --images=DIR --out=DIR --resolution=H,W \
        --encoder_path=FLUX2_KLEIN_FOLDER [--batch_size=8] [--records_per_shard=1000] \
        [--latents_dtype=float16] [--max_sequence_length=512] [--device=cuda] [--skip_bad] [--overwrite]

``DIR`` is searched recursively for images; each image ``a/b.png`` needs its caption in ``a/b.txt``
(UTF-8, surrounding whitespace stripped; a missing caption is a bad example). Images are converted
to RGB (alpha dropped), centre-cropped to the aspect ratio of ``H x W`` and Lanczos-resized to it
(an image already ``H x W`` is stored unchanged). ``H`` and ``W`` must be multiples of 16.

Encoding is pluggable: :func:`prepare_t2i_dataset` takes any ``encode_fn(images, captions)`` with
``images`` uint8 [B, H, W, 3] and ``captions`` a list of B strings, returning ``(latents
[B, H/16, W/16, C], prompt_embeds [B, L, D])`` or ``(latents, prompt_embeds, num_tokens [B])``
(numpy). The FLUX.2 klein encoder (:func:`flux2_klein_encoder`) loads the VAE and the Qwen3 text
encoder from a LOCAL diffusers folder and needs the optional packages ``torch``, ``diffusers``
(>= 0.42, with ``Flux2KleinPipeline``) and ``transformers``; they are imported only inside it, never
by training. ``--encode_fn=MODULE:NAME`` uses another (already built) encode function instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from asymflow_jax.data import t2i
from asymflow_jax.data.sources import IMAGE_EXTENSIONS

EncodeFn = Callable[[np.ndarray, list], tuple]


# ----------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------


def list_pairs(images_dir: str, caption_ext: str = ".txt") -> list[tuple[str, str]]:
  """[(image path, caption path)] of every image under ``images_dir``, sorted by relative path.

  The caption path is the image path with its extension replaced by ``caption_ext`` (it may not exist).
  """
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"image folder not found: {images_dir}")
  found = []
  for dirpath, dirnames, filenames in os.walk(images_dir):
    dirnames.sort()
    found.extend(os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS))
  if not found:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {images_dir}")
  found.sort(key=lambda p: os.path.relpath(p, images_dir))
  return [(p, os.path.splitext(p)[0] + caption_ext) for p in found]


def read_caption(path: str) -> str:
  """The caption text (UTF-8, whitespace stripped); ValueError naming the file if missing/unreadable."""
  if not os.path.exists(path):
    raise ValueError(f"caption file {path} not found (each image needs a same-stem caption file)")
  try:
    with open(path, encoding="utf-8") as f:
      return f.read().strip()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read caption {path}: {e}") from e


def crop_box(width: int, height: int, resolution: Sequence[int]) -> tuple[float, float, float, float]:
  """The centred (left, top, right, bottom) box of a ``width x height`` image with the aspect ratio
  of ``resolution = (H, W)`` (the largest such box)."""
  out_h, out_w = resolution
  scale = max(out_w / width, out_h / height)
  box_w, box_h = out_w / scale, out_h / scale
  left, top = (width - box_w) / 2, (height - box_h) / 2
  return (left, top, left + box_w, top + box_h)


def load_image(path: str, resolution: Sequence[int]) -> np.ndarray:
  """An image file -> uint8 [H, W, 3]: RGB, centre crop to the aspect ratio, Lanczos resize.

  Raises ValueError naming the file if it cannot be read.
  """
  out_h, out_w = (int(v) for v in resolution)
  try:
    with Image.open(path) as img:
      img = img.convert("RGB")
      if img.size != (out_w, out_h):
        img = img.resize((out_w, out_h), Image.Resampling.LANCZOS, box=crop_box(img.width, img.height, (out_h, out_w)))
      image = np.asarray(img, dtype=np.uint8)
  except Exception as e:
    raise ValueError(f"cannot read image {path}: {e}") from e
  return image


def parse_resolution(text) -> tuple[int, int]:
  """'H,W' (or 'S' for square, or a pair) -> (H, W); ValueError naming the value."""
  try:
    parts = [int(v) for v in (text.replace("x", ",").split(",") if isinstance(text, str) else text)]
  except (TypeError, ValueError):
    parts = []
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) < 1:
    raise ValueError(f"resolution={text!r}: expected 'H,W' (positive integers), e.g. '1024,1024'")
  return parts[0], parts[1]


# ----------------------------------------------------------------------------
# Dataset writing.
# ----------------------------------------------------------------------------


def _check_encoded(out, n: int, resolution, down: int):
  """encode_fn output -> (latents [n, h, w, C], prompt_embeds [n, L, D], num_tokens [n] int)."""
  if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
    raise ValueError(f"encode_fn returned {type(out).__name__}; expected (latents, prompt_embeds[, num_tokens])")
  latents, embeds = np.asarray(out[0]), np.asarray(out[1])
  tokens = np.asarray(out[2]) if len(out) == 3 else np.full((n,), -1)
  h, w = resolution[0] // down, resolution[1] // down
  if latents.ndim != 4 or latents.shape[:3] != (n, h, w):
    raise ValueError(f"encode_fn latents shape {list(latents.shape)}; expected [{n}, {h}, {w}, C] "
                     f"(batch, resolution / {down})")
  if embeds.ndim != 3 or embeds.shape[0] != n:
    raise ValueError(f"encode_fn prompt_embeds shape {list(embeds.shape)}; expected [{n}, L, D]")
  if tokens.shape != (n,) or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"encode_fn num_tokens {tokens.dtype}{list(tokens.shape)}; expected integers [{n}]")
  return latents, embeds, tokens


def prepare_t2i_dataset(images_dir: str, out_dir: str, *, resolution: Sequence[int], encode_fn: EncodeFn,
                        encoder_info: dict | None = None, batch_size: int = 8, records_per_shard: int = 1000,
                        latents_dtype: str = "float16", caption_ext: str = ".txt", skip_bad: bool = False,
                        overwrite: bool = False, progress: bool = True) -> dict:
  """Function form of the CLI: encodes every (image, caption) pair under ``images_dir`` and writes the
  dataset folder ``out_dir``. Returns its meta dict (also ``out_dir/meta.json``).

  Args:
    resolution: (H, W), multiples of 16.
    encode_fn: ``(uint8 [B, H, W, 3], list of B captions) -> (latents, prompt_embeds[, num_tokens])``;
      also called once as ``encode_fn(first image [1, H, W, 3], [""])`` for the empty-prompt embedding.
    encoder_info: JSON-able identity of the encoders, stored in meta.json["encoder"].
    skip_bad: skip (and count) unreadable images / missing captions instead of failing.
  """
  import tqdm  # pylint: disable=g-import-not-at-top
  resolution = parse_resolution(resolution)
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected an integer >= 1")
  pairs = list_pairs(images_dir, caption_ext)
  down = t2i.LATENT_DOWNSAMPLE
  skipped: list[str] = []
  first_image = None
  with t2i.T2IWriter(out_dir, resolution, records_per_shard=records_per_shard, latents_dtype=latents_dtype,
                     latent_downsample=down, overwrite=overwrite) as writer:
    bar = tqdm.tqdm(total=len(pairs), desc=f"encoding {os.path.basename(os.path.abspath(out_dir))}",
                    unit="img", disable=not progress)
    for start in range(0, len(pairs), batch_size):
      images, captions = [], []
      for image_path, caption_path in pairs[start:start + batch_size]:
        try:
          caption = read_caption(caption_path)
          image = load_image(image_path, resolution)
        except ValueError as e:
          if not skip_bad:
            raise ValueError(f"{e} (use --skip_bad / skip_bad=True to skip it)") from e
          skipped.append(str(e))
          continue
        images.append(image)
        captions.append(caption)
      bar.update(len(pairs[start:start + batch_size]))
      if not images:
        continue
      batch = np.stack(images)
      if first_image is None:
        first_image = batch[:1]
      latents, embeds, tokens = _check_encoded(encode_fn(batch, captions), len(images), resolution, down)
      for i, caption in enumerate(captions):
        writer.write(images[i], latents[i], embeds[i], caption, num_tokens=int(tokens[i]))
    bar.close()
    if first_image is None:
      raise ValueError(f"no readable image + caption pairs under {images_dir} ({len(skipped)} skipped)")
    empty_latents, empty_embeds, empty_tokens = _check_encoded(encode_fn(first_image, [""]), 1, resolution, down)
    del empty_latents
    meta = writer.finish(empty_embeds[0], empty_num_tokens=int(empty_tokens[0]), encoder=encoder_info,
                         extra={"source_images": os.path.abspath(images_dir), "num_skipped": len(skipped),
                                "skipped": skipped,
                                "preprocessing": "RGB, centre crop to the aspect ratio, Lanczos resize"})
  return meta


# ----------------------------------------------------------------------------
# The FLUX.2 klein encoders (optional: torch + diffusers + transformers).
# ----------------------------------------------------------------------------


def flux2_klein_encoder(encoder_path: str, *, device: str | None = None, dtype: str = "bfloat16",
                        vae_dtype: str = "float32", max_sequence_length: int = 512,
                        text_encoder_layers: Sequence[int] = (9, 18, 27)) -> tuple[EncodeFn, dict]:
  """Builds ``(encode_fn, encoder_info)`` from a LOCAL FLUX.2 klein diffusers folder (subfolders
  ``vae``, ``text_encoder``, ``tokenizer``; nothing is downloaded).

  Follows diffusers 0.42 ``Flux2KleinPipeline``: latents = ``vae.encode(2 x/255 - 1)`` posterior mode
  (``sample_mode="argmax"``), ``_patchify_latents`` (2x2, channel-first (c, py, px) -> 128 ch at H/16),
  ``(z - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)``, returned NHWC float32; prompt
  embeddings = ``_get_qwen3_prompt_embeds`` (chat template with ``enable_thinking=False``, padding to
  ``max_sequence_length``, hidden states of ``text_encoder_layers`` stacked -> [B, L, 3 * hidden]);
  ``num_tokens`` = the unpadded token count of the templated prompt (truncated at L).

  NOT RUN in this repository's tests (no weights, no torch there): the tests use a fake numpy
  encoder. Check it once on real weights (e.g. compare a decoded latent with the image) before a
  large prep run. Needs ``pip install torch diffusers transformers``.

  Args:
    device: torch device ('cuda', 'cpu', ...); None = cuda if available.
    dtype: text encoder dtype (the pipeline's bfloat16). vae_dtype: VAE dtype (float32 for exact caches).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import AutoencoderKLFlux2  # pylint: disable=g-import-not-at-top
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline  # pylint: disable=g-import-not-at-top
    from diffusers.pipelines.flux2.pipeline_flux2_klein import retrieve_latents  # pylint: disable=g-import-not-at-top
    from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"the FLUX.2 klein encoder needs torch, diffusers (>= 0.42) and transformers: {e}. "
                      "Install them (pip install torch diffusers transformers) in the prep environment") from e
  if not os.path.isdir(encoder_path):
    raise FileNotFoundError(f"encoder_path={encoder_path!r} is not a folder (a local FLUX.2 klein diffusers "
                            "folder with vae/, text_encoder/, tokenizer/)")
  missing = [d for d in ("vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(encoder_path, d))]
  if missing:
    raise FileNotFoundError(f"encoder_path={encoder_path!r} has no sub-folder(s) {missing}; expected a FLUX.2 "
                            "klein diffusers folder")
  dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
  for name, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
    if value not in dtypes:
      raise ValueError(f"{name}={value!r}: expected one of {sorted(dtypes)}")
  layers = tuple(int(v) for v in text_encoder_layers)
  device = device or ("cuda" if torch.cuda.is_available() else "cpu")
  vae = AutoencoderKLFlux2.from_pretrained(encoder_path, subfolder="vae", torch_dtype=dtypes[vae_dtype],
                                           local_files_only=True).to(device).eval()
  text_encoder = Qwen3ForCausalLM.from_pretrained(encoder_path, subfolder="text_encoder", dtype=dtypes[dtype],
                                                  local_files_only=True).to(device).eval()
  tokenizer = Qwen2TokenizerFast.from_pretrained(encoder_path, subfolder="tokenizer", local_files_only=True)

  def count_tokens(caption: str) -> int:
    text = tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    ids = tokenizer(text, truncation=True, max_length=max_sequence_length)["input_ids"]
    return len(ids)

  @torch.no_grad()
  def encode_fn(images: np.ndarray, captions: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    x = (x.to(torch.float32) / 255.0 * 2.0 - 1.0).to(dtypes[vae_dtype])   # VaeImageProcessor: 2 (x / 255) - 1
    z = retrieve_latents(vae.encode(x), sample_mode="argmax")
    z = Flux2KleinPipeline._patchify_latents(z)  # pylint: disable=protected-access
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
    z = (z - mean) / std
    latents = z.permute(0, 2, 3, 1).float().cpu().numpy()
    embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(  # pylint: disable=protected-access
        text_encoder=text_encoder, tokenizer=tokenizer, prompt=list(captions), dtype=dtypes[dtype],
        device=device, max_sequence_length=max_sequence_length, hidden_states_layers=layers)
    prompt_embeds = embeds.float().cpu().numpy()
    num_tokens = np.array([count_tokens(c) for c in captions], np.int32)
    return latents, prompt_embeds, num_tokens

  info = {"name": "flux2_klein", "path": os.path.abspath(encoder_path),
          "vae": type(vae).__name__, "text_encoder": type(text_encoder).__name__,
          "text_encoder_layers": list(layers), "max_sequence_length": max_sequence_length,
          "text_encoder_hidden_size": int(text_encoder.config.hidden_size),
          "vae_latent_channels": int(vae.config.latent_channels),
          "vae_batch_norm_eps": float(vae.config.batch_norm_eps),
          "dtype": dtype, "vae_dtype": vae_dtype, "latent_mode": "posterior mode (argmax)",
          "latent_normalisation": "patchify 2x2 (c, py, px), (z - bn.running_mean) / sqrt(bn.running_var + eps)"}
  index = os.path.join(encoder_path, "model_index.json")
  if os.path.exists(index):
    with open(index) as f:
      model_index = json.load(f)
    info["pipeline"] = model_index.get("_class_name")
    info["diffusers_version"] = model_index.get("_diffusers_version")
  return encode_fn, info


def _import_callable(spec: str):
  """'package.module:name' -> the object."""
  module, sep, name = spec.partition(":")
  if not sep or not module or not name:
    raise ValueError(f"--encode_fn={spec!r}: expected MODULE:NAME, e.g. mypkg.encoders:encode")
  obj = getattr(importlib.import_module(module), name, None)
  if not callable(obj):
    raise ValueError(f"--encode_fn={spec!r}: {module} has no callable {name!r}")
  return obj


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m asymflow_jax.data.t2i_prep",
      description="Write a text-to-image dataset (images + FLUX.2 latents + prompt embeddings).")
  parser.add_argument("--images", required=True, help="folder of images + same-stem caption files (recursive)")
  parser.add_argument("--out", required=True, help="output dataset folder")
  parser.add_argument("--resolution", required=True, help="H,W (multiples of 16), e.g. 1024,1024")
  parser.add_argument("--encoder_path", default="", help="local FLUX.2 klein diffusers folder")
  parser.add_argument("--encode_fn", default="", help="MODULE:NAME of another encode_fn(images, captions)")
  parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
  parser.add_argument("--dtype", default="bfloat16", help="text encoder dtype")
  parser.add_argument("--vae_dtype", default="float32")
  parser.add_argument("--max_sequence_length", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--records_per_shard", type=int, default=1000)
  parser.add_argument("--latents_dtype", default="float16", choices=t2i.LATENT_DTYPES)
  parser.add_argument("--caption_ext", default=".txt")
  parser.add_argument("--skip_bad", action="store_true", help="skip unreadable images / missing captions")
  parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    if bool(args.encoder_path) == bool(args.encode_fn):
      raise ValueError("give exactly one of --encoder_path (FLUX.2 klein folder) or --encode_fn (MODULE:NAME)")
    if args.encode_fn:
      encode_fn, info = _import_callable(args.encode_fn), {"name": args.encode_fn}
    else:
      encode_fn, info = flux2_klein_encoder(args.encoder_path, device=args.device, dtype=args.dtype,
                                            vae_dtype=args.vae_dtype, max_sequence_length=args.max_sequence_length)
    meta = prepare_t2i_dataset(args.images, args.out, resolution=args.resolution, encode_fn=encode_fn,
                               encoder_info=info, batch_size=args.batch_size,
                               records_per_shard=args.records_per_shard, latents_dtype=args.latents_dtype,
                               caption_ext=args.caption_ext, skip_bad=args.skip_bad, overwrite=args.overwrite,
                               progress=not args.no_progress)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {meta['num_records']} records in {len(meta['shards'])} shard(s) to {args.out} "
        f"({meta['num_skipped']} skipped)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
