"""Builds the DINOv2 parity fixture from Hugging Face ``transformers`` (run with a torch + transformers venv):

    /path/to/torch-venv/bin/python tests/make_dinov2_fixture.py [OUT_DIR (default tests/fixtures)]

Two tiny random models (hidden 32, 2 layers, 2 heads, patch 4, image_size 16: a native 4x4 patch grid):

  * ``plain``: ``Dinov2Model`` (GELU MLP, mask token),
  * ``registers``: ``Dinov2WithRegistersModel`` with 3 register tokens and the SwiGLU feed-forward
    (``use_swiglu_ffn``); its position embeddings are interpolated with ``antialias=True``.

Writes
  * ``dinov2_tiny.npz``: per case ``<case>/<name>``: ``pixel_values`` (NCHW, as torch takes them),
    ``hidden_states`` (num_hidden_layers + 1, B, T, D): the embedding output then each layer's output,
    ``last_hidden_state`` (B, T, D) (after the final LayerNorm), ``pos_embed`` (1, 1 + N, D): the (possibly
    interpolated) position embeddings the model adds. Cases: ``<variant>_native`` (16x16 pixels), ``<variant>_up``
    (24x20 -> a 6x5 grid) and ``<variant>_down`` (8x13 -> 2x3, the last pixel column cropped by the strided conv).
    Also ``interp/<name>``: torch's bicubic ``F.interpolate`` of a random (1, 3, 7, 7) grid to (3, 5) and (11, 9),
    with and without antialias (``grid``, ``down``, ``up``, ``down_aa``, ``up_aa``),
  * ``dinov2_tiny.json``: the configs, the cases and provenance,
  * ``dinov2_tiny_hf/plain/``: ``save_pretrained`` output (one ``model.safetensors``, float32),
  * ``dinov2_tiny_hf/registers/``: ``save_pretrained`` output, sharded (``model.safetensors.index.json``),
    bfloat16.

Every weight is random and non-zero (LayerNorm gains and biases, layer scales, tokens, biases), rounded to
bfloat16-representable values so the bfloat16 files are exact and the float32 forward is the reference for both.
Everything runs in float32 on CPU with eager attention.
"""

import json
import pathlib
import sys

try:
  import numpy as np
  import torch
  import transformers
  from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
except ImportError as e:  # pragma: no cover
  sys.exit(f"make_dinov2_fixture.py needs torch and transformers (>= 5) installed ({e}); run it with a "
           "separate torch venv, never from the package or its tests.")

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4, hidden_act="gelu",
              layer_norm_eps=1e-6, image_size=16, patch_size=4, num_channels=3, qkv_bias=True, layerscale_value=1.0)
PLAIN = dict(COMMON, use_swiglu_ffn=False, use_mask_token=True)
REGISTERS = dict(COMMON, use_swiglu_ffn=True, num_register_tokens=3)
BATCH = 2
SIZES = {"native": (16, 16), "up": (24, 20), "down": (8, 13)}


def representable(w: torch.Tensor) -> torch.Tensor:
  """Rounded to bfloat16 with |w| >= 2^-10 (non-zero)."""
  w = torch.sign(w) * torch.clamp(w.abs(), min=2.0 ** -10)
  w = torch.where(w == 0, torch.full_like(w, 2.0 ** -10), w)
  return w.to(torch.bfloat16).to(torch.float32)


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Linear/conv weights ~ N(0, 1/fan_in); LayerNorm gains ~ U(0.5, 1.5); layer scales ~ U(0.3, 1.3);
  biases, LayerNorm biases ~ N(0, 0.2^2); tokens and position embeddings ~ N(0, 0.5^2); every value non-zero."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("weight") and p.ndim >= 2:
        w = torch.randn(p.shape, generator=gen) / np.sqrt(np.prod(p.shape[1:]))
      elif "norm" in name and name.endswith("weight"):
        w = 0.5 + torch.rand(p.shape, generator=gen)
      elif name.endswith("lambda1"):
        w = 0.3 + torch.rand(p.shape, generator=gen)
      elif name.endswith("bias"):
        w = 0.2 * torch.randn(p.shape, generator=gen)
      else:
        w = 0.5 * torch.randn(p.shape, generator=gen)
      p.copy_(representable(w))
      assert torch.all(p != 0), name


def run(model, pixel_values: np.ndarray) -> dict:
  """Embedding output, every layer's output, the last hidden state and the added position embeddings."""
  caught = {"layers": []}
  emb = model.embeddings
  hooks = [emb.register_forward_hook(lambda m, a, o: caught.__setitem__("emb", o))]
  hooks += [layer.register_forward_hook(lambda m, a, o: caught["layers"].append(o[0] if isinstance(o, tuple) else o))
            for layer in model.encoder.layer]
  x = torch.from_numpy(pixel_values)
  with torch.no_grad():
    out = model(pixel_values=x).last_hidden_state
    p = model.config.patch_size
    n_tokens = 1 + (x.shape[2] // p) * (x.shape[3] // p)
    pos = emb.interpolate_pos_encoding(torch.zeros(1, n_tokens, model.config.hidden_size), x.shape[2], x.shape[3])
  for h in hooks:
    h.remove()
  res = dict(last_hidden_state=out, hidden_states=torch.stack([caught["emb"]] + caught["layers"]), pos_embed=pos)
  return {k: v.detach().numpy().astype(np.float32) for k, v in res.items()}


def interp_cases(rng) -> dict:
  grid = rng.standard_normal((1, 3, 7, 7), dtype=np.float32)
  g = torch.from_numpy(grid)
  out = {"grid": grid}
  for name, size in (("down", (3, 5)), ("up", (11, 9))):
    for aa in (False, True):
      r = torch.nn.functional.interpolate(g, size=size, mode="bicubic", align_corners=False, antialias=aa)
      out[name + ("_aa" if aa else "")] = r.numpy()
  return out


def main(out_dir: pathlib.Path) -> None:
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(20250313)
  models = {"plain": Dinov2Model(Dinov2Config(**PLAIN, attn_implementation="eager")).eval(),
            "registers": Dinov2WithRegistersModel(
                Dinov2WithRegistersConfig(**REGISTERS, attn_implementation="eager")).eval()}
  for m in models.values():
    randomize(m, gen)

  rng = np.random.default_rng(0)
  arrays, cases = {}, {}
  for variant, model in models.items():
    for size_name, (h, w) in SIZES.items():
      case = f"{variant}_{size_name}"
      pixels = rng.standard_normal((BATCH, 3, h, w), dtype=np.float32)
      cases[case] = dict(variant=variant, height=h, width=w)
      arrays[f"{case}/pixel_values"] = pixels
      for k, v in run(model, pixels).items():
        arrays[f"{case}/{k}"] = v
  for k, v in interp_cases(rng).items():
    arrays[f"interp/{k}"] = v

  out_dir.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out_dir / "dinov2_tiny.npz", **arrays)
  folder = out_dir / "dinov2_tiny_hf"
  models["plain"].save_pretrained(folder / "plain")
  models["registers"].to(torch.bfloat16).save_pretrained(folder / "registers", max_shard_size="40KB")
  models["registers"].to(torch.float32)
  for f in folder.rglob("*"):
    f.chmod(0o755 if f.is_dir() else 0o644)
  for variant, cls in (("plain", Dinov2Model), ("registers", Dinov2WithRegistersModel)):   # the files are exact
    reloaded = cls.from_pretrained(folder / variant, dtype=torch.float32, attn_implementation="eager").eval()
    case = f"{variant}_up"
    got = run(reloaded, arrays[f"{case}/pixel_values"])["last_hidden_state"]
    assert np.array_equal(got, arrays[f"{case}/last_hidden_state"]), variant
  meta = {
      "source": f"transformers {transformers.__version__} Dinov2Model / Dinov2WithRegistersModel, torch "
                f"{torch.__version__}, float32 on CPU, eager attention, random non-zero weights "
                "(see tests/make_dinov2_fixture.py)",
      "configs": {"plain": PLAIN, "registers": REGISTERS},
      "folders": {"plain": "dinov2_tiny_hf/plain (single model.safetensors, float32)",
                  "registers": "dinov2_tiny_hf/registers (sharded, bfloat16)"},
      "cases": cases,
      "keys": sorted(arrays),
  }
  (out_dir / "dinov2_tiny.json").write_text(json.dumps(meta, indent=1) + "\n")
  print("wrote", out_dir / "dinov2_tiny.npz", sum(v.nbytes for v in arrays.values()), "bytes of arrays")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent / "fixtures")
