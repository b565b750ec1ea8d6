"""Builds the FLUX.2 parity fixture from diffusers' ``Flux2Transformer2DModel`` (run with a torch + diffusers venv):

    /path/to/torch-venv/bin/python tests/make_flux2_fixture.py [OUT_DIR (default tests/fixtures)]

Writes
  * ``flux2_tiny.npz``: per case ``<case>/<name>``: inputs (hidden_states, encoder_hidden_states, timestep,
    [guidance], img_ids, txt_ids), the RoPE tables (rope_cos, rope_sin; text then image rows), the output and
    intermediates (temb; double_txt / double_img (num_layers, B, ., D), each double block's (txt, img) outputs;
    single (num_single_layers, B, L + N, D); pre_proj_out (B, N, D), the norm_out output),
  * ``flux2_tiny.json``: the two model configs, the cases and provenance,
  * ``flux2_tiny_diffusers/klein/``: the guidance-free model as ``save_pretrained`` writes it (one
    ``diffusion_pytorch_model.safetensors``, float16),
  * ``flux2_tiny_diffusers/guided/``: the guidance-embedding model, sharded (``*.safetensors.index.json``,
    bfloat16).

The weights are random and non-zero everywhere (the RMSNorm gains too), rounded to values that bfloat16 and
float16 both hold exactly (|w| >= 2^-10, 8 significant bits), so the float16/bfloat16 files store them exactly
and the float32 forward below is the reference for both. The guided model is the klein model plus a guidance
embedder (same values elsewhere). Everything runs in float32 on CPU.
"""

import json
import pathlib
import sys

try:
  import numpy as np
  import torch
  import diffusers
  from diffusers import Flux2Transformer2DModel
  from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
except ImportError as e:  # pragma: no cover
  sys.exit(f"make_flux2_fixture.py needs torch and diffusers (>= 0.42) installed ({e}); run it with a "
           "separate torch venv, never from the package or its tests.")

CONFIG = dict(patch_size=1, in_channels=8, out_channels=None, num_layers=2, num_single_layers=2,
              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
              mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, eps=1e-6)
BATCH, TEXT_LEN, REF_H, REF_W = 2, 5, 2, 2
# klein: a 4x4 grid; klein_ref: a 3x4 grid + a 2x2 reference (also 16 tokens, so one compiled program serves
# both klein cases); guided: a 3x4 grid.


def representable(w: torch.Tensor) -> torch.Tensor:
  """Rounded to bfloat16 with |w| >= 2^-10 (then float16 holds it exactly too)."""
  w = torch.sign(w) * torch.clamp(w.abs(), min=2.0 ** -10)
  w = torch.where(w == 0, torch.full_like(w, 2.0 ** -10), w)
  w = w.to(torch.bfloat16).to(torch.float32)
  assert torch.equal(w.to(torch.float16).to(torch.float32), w)
  return w


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
  """Linear weights ~ N(0, 1/in), norm gains ~ U(0.5, 1.5); every value non-zero."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 2:
        w = torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[1])
      else:
        w = 0.5 + torch.rand(p.shape, generator=gen)
      p.copy_(representable(w))
      assert torch.all(p != 0), name


def run(model, inputs: dict) -> dict:
  """Output and intermediates of one forward (float32, no grad)."""
  caught = {"double": [], "single": []}
  hooks = [model.time_guidance_embed.register_forward_hook(lambda m, a, o: caught.__setitem__("temb", o)),
           model.norm_out.register_forward_hook(lambda m, a, o: caught.__setitem__("pre_proj_out", o))]
  hooks += [b.register_forward_hook(lambda m, a, o: caught["double"].append(o)) for b in model.transformer_blocks]
  hooks += [b.register_forward_hook(lambda m, a, o: caught["single"].append(o))
            for b in model.single_transformer_blocks]
  t = {k: torch.from_numpy(v) for k, v in inputs.items()}
  with torch.no_grad():
    out = model(hidden_states=t["hidden_states"], encoder_hidden_states=t["encoder_hidden_states"],
                timestep=t["timestep"], img_ids=t["img_ids"], txt_ids=t["txt_ids"], guidance=t.get("guidance"),
                return_dict=False)[0]
    cos, sin = model.pos_embed(torch.cat([t["txt_ids"], t["img_ids"]], dim=0))
  for h in hooks:
    h.remove()
  res = dict(output=out, temb=caught["temb"], pre_proj_out=caught["pre_proj_out"], rope_cos=cos, rope_sin=sin,
             double_txt=torch.stack([o[0] for o in caught["double"]]),
             double_img=torch.stack([o[1] for o in caught["double"]]),
             single=torch.stack(caught["single"]))
  return {k: v.numpy().astype(np.float32) for k, v in res.items()}


def main(out_dir: pathlib.Path) -> None:
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(20250101)
  guided = Flux2Transformer2DModel(**CONFIG, guidance_embeds=True).eval()
  randomize(guided, gen)
  klein = Flux2Transformer2DModel(**CONFIG, guidance_embeds=False).eval()
  state = {k: v for k, v in guided.state_dict().items() if not k.startswith("time_guidance_embed.guidance_embedder.")}
  klein.load_state_dict(state, strict=True)

  rng = np.random.default_rng(0)
  d_in, d_txt = CONFIG["in_channels"], CONFIG["joint_attention_dim"]

  def base_inputs(grid_h, grid_w):
    latents = torch.zeros(BATCH, d_in, grid_h, grid_w)
    prompt = torch.zeros(BATCH, TEXT_LEN, d_txt)
    return dict(hidden_states=rng.standard_normal((BATCH, grid_h * grid_w, d_in), dtype=np.float32),
                encoder_hidden_states=rng.standard_normal((BATCH, TEXT_LEN, d_txt), dtype=np.float32),
                timestep=np.array([0.3, 0.85], np.float32),
                # the pipeline's own id builders ((B, S, 4) int64; the model uses entry 0)
                img_ids=Flux2KleinPipeline._prepare_latent_ids(latents)[0].numpy(),
                txt_ids=Flux2KleinPipeline._prepare_text_ids(prompt)[0].numpy())

  cases = {}
  cases["klein"] = ("klein", base_inputs(4, 4))
  ref = base_inputs(3, 4)
  ref_ids = Flux2KleinPipeline._prepare_image_ids([torch.zeros(1, d_in, REF_H, REF_W)])[0].numpy()   # T = 10
  ref["hidden_states"] = np.concatenate(
      [ref["hidden_states"], rng.standard_normal((BATCH, REF_H * REF_W, d_in), dtype=np.float32)], axis=1)
  ref["img_ids"] = np.concatenate([ref["img_ids"], ref_ids], axis=0)
  ref["timestep"] = np.array([0.05, 0.6], np.float32)
  cases["klein_ref"] = ("klein", ref)
  g = base_inputs(3, 4)
  g["guidance"] = np.array([3.5, 1.25], np.float32)
  g["timestep"] = np.array([1.0, 0.45], np.float32)
  cases["guided"] = ("guided", g)

  models = {"klein": klein, "guided": guided}
  arrays = {}
  for case, (variant, inputs) in cases.items():
    for k, v in inputs.items():
      arrays[f"{case}/{k}"] = v.astype(np.int32) if k.endswith("_ids") else v
    for k, v in run(models[variant], inputs).items():
      arrays[f"{case}/{k}"] = v

  out_dir.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out_dir / "flux2_tiny.npz", **arrays)
  folder = out_dir / "flux2_tiny_diffusers"
  klein.to(torch.float16).save_pretrained(folder / "klein")
  guided.to(torch.bfloat16).save_pretrained(folder / "guided", max_shard_size="60KB")
  for f in folder.rglob("*"):
    f.chmod(0o755 if f.is_dir() else 0o644)
  for variant, inputs in (("klein", cases["klein"][1]), ("guided", cases["guided"][1])):   # the files are exact
    reloaded = Flux2Transformer2DModel.from_pretrained(folder / variant, torch_dtype=torch.float32).eval()
    case = "klein" if variant == "klein" else "guided"
    assert np.array_equal(run(reloaded, inputs)["output"], arrays[f"{case}/output"]), variant
  meta = {
      "source": f"diffusers {diffusers.__version__} Flux2Transformer2DModel, torch {torch.__version__}, float32 "
                "on CPU, random non-zero weights (see tests/make_flux2_fixture.py)",
      "configs": {"klein": {**CONFIG, "guidance_embeds": False}, "guided": {**CONFIG, "guidance_embeds": True}},
      "folders": {"klein": "flux2_tiny_diffusers/klein (single file, float16)",
                  "guided": "flux2_tiny_diffusers/guided (sharded, bfloat16)"},
      "cases": {
          "klein": "klein model, text (0,0,0,l) + image (0,h,w,0) ids of a 4x4 grid",
          "klein_ref": "klein model, a 3x4 image followed by a 2x2 reference image with ids (10,h,w,0)",
          "guided": "guided model with a guidance input, a 3x4 image",
      },
      "case_variant": {case: variant for case, (variant, _) in cases.items()},
      "keys": sorted(arrays),
  }
  (out_dir / "flux2_tiny.json").write_text(json.dumps(meta, indent=1) + "\n")
  print("wrote", out_dir / "flux2_tiny.npz", sum(v.nbytes for v in arrays.values()), "bytes of arrays")


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent / "fixtures")
