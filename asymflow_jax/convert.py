r"""Convert a reference PyTorch AsymJiT checkpoint into a workdir that sample, evaluate and train open.

Usage:
  python -m asymflow_jax.convert --from=pytorch --checkpoint=CKPT.(safetensors|pth|pt|npz) \
      --config=configs/imagenet256_h16.py [--set model.rank=8 ...] --workdir=DIR [--prefix=module.]

The config names the experiment the weights belong to (its model fields must match the state
dict); the workdir gets its ``config.json`` and checkpoint step 0 with ``params`` and ``subspace``
(see ``asymflow_jax/checkpoint.py``). ``train --workdir=DIR`` then finetunes (fresh optimizer and
EMA), ``sample``/``evaluate --workdir=DIR`` use the weights directly.

Layouts: a torch Linear weight is (out, in) -> Flax kernel (in, out). The conv patch embed proj1
weight (out, C, py, px) -> Dense kernel (D, out) with D in DiT (py, px, c) order; the 1x1 conv proj2
(out, in, 1, 1) -> (in, out). The fixed buffers (x_embedder.pos_embed, feat_rope*.base_rope.freqs_*)
are recomputed by the model; if present they are only checked for consistency. ``proj_buffer`` is
the basis U (D, r); ``scale_buffer`` (optional, default 1) is s.

Checked before anything is written: every key and shape (one error listing all problems), finite
weights, an orthonormal finite basis of the config's rank, a finite scale > 0, and a workdir
that does not exist yet.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from etils import epath

from asymflow_jax import asymflow as af
from asymflow_jax import checkpoint
from asymflow_jax import cli
from asymflow_jax import config as config_lib
from asymflow_jax import experiment
from asymflow_jax.models.jit_model import JiTConfig, jit_config, rope_tables_2d, sincos_pos_embed_2d


def _linear(w):
  return np.ascontiguousarray(w.T)


def _conv_patch(w):
  """(out, C, py, px) -> (py*px*C, out) in DiT (py, px, c) order."""
  out = w.shape[0]
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, out))


def _conv1x1(w):
  return np.ascontiguousarray(w[:, :, 0, 0].T)


def _identity(w):
  return np.asarray(w)


def _param_table(cfg: JiTConfig):
  """torch key -> (torch shape, flax path tuple, transform)."""
  h, p, c, bn = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.bottleneck_dim
  hid = cfg.swiglu_hidden
  t = {}

  def linear(tkey, fpath, out_f, in_f, bias=True):
    t[f"{tkey}.weight"] = ((out_f, in_f), fpath + ("kernel",), _linear)
    if bias:
      t[f"{tkey}.bias"] = ((out_f,), fpath + ("bias",), _identity)

  def norm(tkey, fpath, dim):
    t[f"{tkey}.weight"] = ((dim,), fpath + ("scale",), _identity)

  t["x_embedder.proj1.weight"] = ((bn, c, p, p), ("x_embedder", "proj1", "kernel"), _conv_patch)
  t["x_embedder.proj2.weight"] = ((h, bn, 1, 1), ("x_embedder", "proj2", "kernel"), _conv1x1)
  t["x_embedder.proj2.bias"] = ((h,), ("x_embedder", "proj2", "bias"), _identity)
  linear("t_embedder.mlp.0", ("t_embedder", "mlp_0"), h, 256)
  linear("t_embedder.mlp.2", ("t_embedder", "mlp_2"), h, h)
  t["y_embedder.embedding_table.weight"] = (
      (cfg.num_classes + 1, h), ("y_embedder", "embedding_table", "embedding"), _identity)
  if cfg.uses_in_context:
    t["in_context_posemb"] = ((1, cfg.in_context_len, h), ("in_context_posemb",), _identity)
  for i in range(cfg.depth):
    tb, fb = f"blocks.{i}", (f"blocks_{i}",)
    norm(f"{tb}.norm1", fb + ("norm1",), h)
    norm(f"{tb}.norm2", fb + ("norm2",), h)
    linear(f"{tb}.attn.qkv", fb + ("attn", "qkv"), 3 * h, h)
    norm(f"{tb}.attn.q_norm", fb + ("attn", "q_norm"), cfg.head_dim)
    norm(f"{tb}.attn.k_norm", fb + ("attn", "k_norm"), cfg.head_dim)
    linear(f"{tb}.attn.proj", fb + ("attn", "proj"), h, h)
    linear(f"{tb}.mlp.w12", fb + ("mlp", "w12"), 2 * hid, h)
    linear(f"{tb}.mlp.w3", fb + ("mlp", "w3"), h, hid)
    linear(f"{tb}.adaLN_modulation.1", fb + ("adaLN_modulation",), 6 * h, h)
  norm("final_layer.norm_final", ("final_layer", "norm_final"), h)
  linear("final_layer.linear", ("final_layer", "linear"), cfg.patch_dim, h)
  linear("final_layer.adaLN_modulation.1", ("final_layer", "adaLN_modulation"), 2 * h, h)
  return t


def _buffer_table(cfg: JiTConfig):
  """Optional fixed buffers: torch key -> expected value (recomputed here)."""
  cos, sin = rope_tables_2d(cfg.head_dim, cfg.grid)
  b = {"x_embedder.pos_embed": sincos_pos_embed_2d(cfg.hidden_size, cfg.grid)[None]}
  for name in ("feat_rope", "feat_rope_incontext"):
    b[f"{name}.base_rope.freqs_cos"] = cos
    b[f"{name}.base_rope.freqs_sin"] = sin
  return b


def torch_state_dict_to_flax(state_dict: dict, config: JiTConfig | str, *, buffer_atol: float = 1e-4):
  """Maps a reference AsymJiT state dict (numpy arrays, torch key layout) to Flax.

  Args:
    state_dict: {torch key: array}. Must hold every parameter and ``proj_buffer`` (D, r);
      ``scale_buffer`` (shape () or (1,)) is optional (default 1.0); the fixed pos-embed / RoPE
      buffers are optional and, when present, must match the recomputed ones within ``buffer_atol``.
    config: a JiTConfig or a preset name.

  Returns:
    (params, basis, scale): params a nested dict of float32 numpy arrays matching
    ``JiT(config).init(...)["params"]`` (unboxed); basis float32 (D, r); scale a Python float.

  Raises:
    ValueError listing every missing key, unexpected key, shape mismatch and inconsistent buffer.
  """
  cfg = jit_config(config) if isinstance(config, str) else config
  table = _param_table(cfg)
  buffers = _buffer_table(cfg)
  sd = {k: np.asarray(v) for k, v in state_dict.items()}

  missing = sorted(k for k in list(table) + ["proj_buffer"] if k not in sd)
  known = set(table) | set(buffers) | {"proj_buffer", "scale_buffer"}
  unexpected = sorted(k for k in sd if k not in known)
  bad_shape = []
  for key, (shape, _, _) in table.items():
    if key in sd and tuple(sd[key].shape) != shape:
      bad_shape.append(f"{key}: got {tuple(sd[key].shape)}, expected {shape}")
  if "proj_buffer" in sd:
    pb = sd["proj_buffer"]
    if pb.ndim != 2 or pb.shape[0] != cfg.patch_dim or pb.shape[1] > cfg.bottleneck_dim:
      bad_shape.append(f"proj_buffer: got {tuple(pb.shape)}, expected ({cfg.patch_dim}, r) "
                       f"with r <= {cfg.bottleneck_dim}")
  if "scale_buffer" in sd and sd["scale_buffer"].size != 1:
    bad_shape.append(f"scale_buffer: got {tuple(sd['scale_buffer'].shape)}, expected () or (1,)")
  bad_buffer = []
  for key, want in buffers.items():
    if key not in sd:
      continue
    got = sd[key]
    if tuple(got.shape) != want.shape:
      bad_shape.append(f"{key}: got {tuple(got.shape)}, expected {want.shape}")
    elif not np.allclose(got.astype(np.float64), want, atol=buffer_atol, rtol=0):
      err = float(np.max(np.abs(got.astype(np.float64) - want)))
      bad_buffer.append(f"{key}: max |diff| {err:.3g} from the recomputed buffer")

  if missing or unexpected or bad_shape or bad_buffer:
    lines = [f"state dict does not match the JiT config {cfg}:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", bad_shape), ("inconsistent fixed buffers", bad_buffer)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)
    raise ValueError("\n".join(lines))

  params: dict = {}
  for key, (_, path, fn) in table.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = fn(sd[key]).astype(np.float32)
  basis = sd["proj_buffer"].astype(np.float32)
  scale = float(sd["scale_buffer"].reshape(())) if "scale_buffer" in sd else 1.0
  return params, basis, scale


# ------------------------------------------------------------------------------------------ I/O


def load_state_dict(path: str, *, prefix: str = "") -> dict:
  """Reads {torch key: numpy array} from .safetensors, .npz (optionally "sd/"-prefixed) or .pth/.pt.

  ``prefix`` (e.g. "module.") is stripped; keys without it are dropped when it is given.
  """
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    from safetensors.numpy import load_file
    sd = dict(load_file(path))
  elif ext == ".npz":
    with np.load(path) as data:
      keys = list(data.files)
      if any(k.startswith("sd/") for k in keys):
        sd = {k[3:]: data[k] for k in keys if k.startswith("sd/")}
      else:
        sd = {k: data[k] for k in keys}
  elif ext in (".pth", ".pt", ".bin", ".ckpt"):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs PyTorch: run `pip install torch`, or convert the "
                        "checkpoint to .safetensors first.") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
      obj = obj["state_dict"]
    sd = {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items() if hasattr(v, "numpy")}
  else:
    raise ValueError(f"unsupported checkpoint extension {ext!r} ({path}); use .safetensors, .npz or .pth.")
  if prefix:
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
  return sd


def check_converted(params, basis, scale, rank: int):
  """Finite weights, an orthonormal finite (D, rank) basis and a finite scale > 0; ValueError listing
  every problem."""
  problems = [f"{'/'.join(path)}: {int(np.sum(~np.isfinite(v)))} non-finite values"
              for path, v in _leaves_with_path(params) if not np.isfinite(v).all()]
  if basis.shape[1] != rank:
    problems.append(f"proj_buffer: rank {basis.shape[1]}, but the config has model.rank={rank}")
  try:
    af.check_basis(np.asarray(basis, np.float32))
  except ValueError as e:
    problems.append(f"proj_buffer: {e}")
  if not (np.isfinite(scale) and scale > 0):
    problems.append(f"scale_buffer: {scale!r}, expected a finite number > 0")
  if problems:
    raise ValueError("the converted checkpoint is not usable:\n  " + "\n  ".join(problems))


def _leaves_with_path(tree, path=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves_with_path(v, path + (k,))
  else:
    yield path, np.asarray(tree)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m asymflow_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--from", dest="source", choices=["pytorch"], required=True,
                      help="source framework of the checkpoint")
  parser.add_argument("--checkpoint", required=True, help=".safetensors, .npz (keys optionally 'sd/'-prefixed) or .pth")
  parser.add_argument("--config", required=True, help="experiment config the weights belong to: configs/X.py[:arg]")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set model.rank=8 (repeatable)")
  parser.add_argument("--workdir", required=True, help="new workdir to write (must not exist)")
  parser.add_argument("--prefix", default="", help="key prefix to strip, e.g. 'module.'")
  args = parser.parse_args(argv)
  try:
    if epath.Path(args.workdir).exists():
      raise ValueError(f"--workdir={args.workdir!r} already exists; choose a new folder (nothing was written).")
    config = cli.load_config(args.config, args.set)
    config_lib.validate_config(config, 1, training=False)
    cfg = experiment.model_from_config(config).config
    sd = load_state_dict(args.checkpoint, prefix=args.prefix)
    params, basis, scale = torch_state_dict_to_flax(sd, cfg)
    check_converted(params, basis, scale, config.model.rank)
  except (ValueError, ImportError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  checkpoint.save_converted(args.workdir, config, params, basis, scale)
  n = sum(int(np.prod(a.shape)) for _, a in _leaves_with_path(params))
  print(f"wrote workdir {args.workdir}: {n:,} params, basis {basis.shape}, scale {scale:g}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
