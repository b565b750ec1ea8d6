"""Writes tests/fixtures/unipc_flow.{npz,json}: the reference AsymFLUX.2 klein T2I sampler on a
closed-form model, for tests/test_t2i_sampling.py.

Needs torch + diffusers (the project keeps them out of its own environment):

    /work/tvenv/bin/python tests/make_unipc_fixture.py [--lakonlab GIT_DIR] [--rev REV]

The official pieces are taken verbatim from a LakonLab git checkout (``git show REV:path``, written
to a temporary module so that ``torch.jit.script`` sees their source): ``FlowAdapterScheduler``
(which drives diffusers' ``UniPCMultistepScheduler``), ``guidance_jit`` and the colour encoders.
The sampling loop is the pixel klein pipeline's (``PixelFlux2KleinPipeline.__call__`` steps 6-7),
restated here because the pipeline itself needs the text encoder. As a cross-check, one case is
also run on a bare diffusers ``UniPCMultistepScheduler`` configured the way FlowAdapter
configures it, and must agree bitwise.

Model: x0 ~ N(mu, std^2) per element with a per-sample mean ``mu`` (the "prompt"), whose exact
velocity E[eps - x0 | x_sigma] is closed form. Arrays are stored channels last (B, H, W, C).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import pathlib
import subprocess
import sys
import tempfile

try:
  import numpy as np
  import torch
  import diffusers
  from diffusers import UniPCMultistepScheduler
except ImportError as e:  # pragma: no cover
  sys.exit(f"make_unipc_fixture.py needs numpy, torch and diffusers ({e}); run it with the torch venv, "
           "e.g. /work/tvenv/bin/python tests/make_unipc_fixture.py")

OUT = pathlib.Path(__file__).resolve().parent / "fixtures"
DEFAULT_LAKONLAB = "/work/.mirror/Lakonik+LakonLab/repo"
OKLAB_MEAN, OKLAB_STD = (0.56, 0.0, 0.01), 0.16   # the AsymFLUX.2 klein configs / pipeline demo


# ------------------------------------------------------------------------ official LakonLab code


def _git_show(repo: str, rev: str, path: str) -> str:
  return subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], check=True, capture_output=True,
                        text=True).stdout


def _definitions(source: str, names, drop_decorators=False) -> str:
  """Source of the top-level definitions ``names`` (optionally without their decorators)."""
  tree = ast.parse(source)
  lines = source.splitlines()
  out = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in names:
      start = node.lineno if drop_decorators else min([node.lineno] + [d.lineno for d in node.decorator_list])
      out.append("\n".join(lines[start - 1:node.end_lineno]))
  missing = set(names) - {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
  if missing:
    raise SystemExit(f"definitions {sorted(missing)} not found")
  return "\n\n\n".join(out)


def load_lakonlab(repo: str, rev: str, tmp: pathlib.Path):
  """(FlowAdapterScheduler, guidance_jit, OklabColorEncoder, RGBColorEncoder) from the checkout."""
  flow = _git_show(repo, rev, "lakonlab/models/diffusions/schedulers/flow_adapter.py")
  gauss = _git_show(repo, rev, "lakonlab/models/diffusions/gaussian_flow.py")
  color = _git_show(repo, rev, "lakonlab/models/architectures/autoencoders/color_encoders.py")
  src = "\n".join([
      flow,
      "from typing import Optional",
      "from diffusers.models.modeling_utils import ModelMixin",
      _definitions(gauss, ["guidance_jit"]),
      _definitions(color, ["OklabColorEncoder", "RGBColorEncoder"], drop_decorators=True),
  ])
  path = tmp / "lakonlab_pieces.py"
  path.write_text(src)
  spec = importlib.util.spec_from_file_location("lakonlab_pieces", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.FlowAdapterScheduler, mod.guidance_jit, mod.OklabColorEncoder, mod.RGBColorEncoder


# ------------------------------------------------------------------------------------ the model


def gaussian_velocity(x, sigma, mu, std):
  """Exact E[eps - x0 | x_sigma], x_sigma = (1 - sigma) x0 + sigma eps, x0 ~ N(mu, std^2)."""
  s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
  var = (1 - s) ** 2 * std ** 2 + s ** 2
  x0 = mu + (1 - s) * std ** 2 / var * (x - (1 - s) * mu)
  return (x - x0) / s


def make_scheduler(FlowAdapterScheduler, shift):
  """The pixel klein pipeline's scheduler (demo/example_asymflux2_klein_pipeline.py); ``shift=None``
  -> its sqrt dynamic shift, else a fixed shift."""
  return FlowAdapterScheduler(
      shift=17.0 if shift is None else shift,
      use_dynamic_shifting=shift is None,
      base_seq_len=1024 ** 2,
      max_seq_len=2048 ** 2,
      base_logshift=math.log(17.0),
      max_logshift=math.log(34.0),
      dynamic_shifting_type='sqrt',
      base_scheduler='UniPCMultistep')


def run_pipeline_loop(scheduler, guidance_jit, vae, noise, mu_pos, mu_neg, std, *, num_steps, guidance, orthogonal,
                      clamp_denoised):
  """PixelFlux2KleinPipeline.__call__ steps 6-7 with the Gaussian model; returns (N, B, C, H, W)."""
  latents = noise.clone()
  do_cfg = guidance > 1
  guidance_scale = torch.tensor(guidance, dtype=torch.float32)
  image_seq_len = latents.shape[2:].numel()
  scheduler.set_timesteps(num_steps, seq_len=image_seq_len)
  scheduler.set_begin_index(0)
  traj = []
  for t in scheduler.timesteps:
    _t = t / 1000
    timestep = _t.expand(latents.shape[0]).to(latents.dtype)
    out = gaussian_velocity(latents, timestep, mu_pos, std).float()
    if do_cfg:
      neg = gaussian_velocity(latents, timestep, mu_neg, std).float()
      out = out + guidance_jit(out, neg, guidance_scale, orthogonal, latents - out * _t)
    if clamp_denoised:
      denoised = latents - out * _t
      image = vae.decode(denoised.to(vae.dtype)).clamp(-1, 1)
      denoised = vae.encode(image).to(latents.dtype)
      out = (latents - denoised) / _t.clamp(min=1e-4)
    latents = scheduler.step(out, t, latents, return_dict=False)[0]
    traj.append(latents.clone())
  return torch.stack(traj)


def run_bare_diffusers(noise, mu, std, *, num_steps, shift):
  """Cross-check: diffusers' UniPC configured as FlowAdapter configures it, no LakonLab code."""
  raw = torch.from_numpy(np.linspace(1, 0, num_steps, dtype=np.float32, endpoint=False))
  sigmas = torch.cat([shift * raw / (1 + (shift - 1) * raw), torch.zeros(1)])
  sched = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                  final_sigmas_type="zero", lower_order_final=True)
  sched.set_timesteps(num_steps)
  sched.timesteps = sigmas[:-1] * 1000
  sched.sigmas = sigmas.clamp(max=1 - 1e-4)
  x = noise.clone()
  traj = []
  for t in sched.timesteps:
    _t = t / 1000
    u = gaussian_velocity(x, _t.expand(x.shape[0]), mu, std)
    x = sched.step(u, t, x, return_dict=False)[0]
    traj.append(x.clone())
  return torch.stack(traj)


def nhwc(a: torch.Tensor) -> np.ndarray:
  return a.movedim(-3, -1).contiguous().numpy().astype(np.float32)


CASES = [  # name, (H, W), steps, shift (None: dynamic), guidance, orthogonal, clamp encoder, mu scale
    ("one_step", (4, 4), 1, 17.0, 1.0, 0.0, None, 0.5),
    ("two_steps", (4, 4), 2, 3.0, 1.0, 0.0, None, 0.5),
    ("plain", (4, 4), 8, 3.0, 1.0, 0.0, None, 0.5),
    ("cfg_plain", (4, 4), 6, 5.0, 3.0, 0.0, None, 0.5),
    ("dynamic_ortho", (6, 8), 5, None, 2.5, 0.5, None, 0.5),
    ("guided_rgb_clamp", (4, 4), 6, 17.0, 4.0, 1.0, "rgb", 0.8),
    ("klein_oklab_clamp", (4, 4), 32, 17.0, 4.0, 1.0, "oklab", 2.0),
]
SCHEDULES = [(1, 1.0), (2, 17.0), (7, 3.0), (32, 17.0), (32, (1024, 1024)), (32, (2048, 2048)), (38, (1280, 960)),
             (50, (512, 512))]
SHIFT_SIZES = [(1024, 1024), (2048, 2048), (1280, 960), (512, 512), (1536, 1536), (4, 4), (6, 8)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lakonlab", default=DEFAULT_LAKONLAB, help="LakonLab git directory")
  parser.add_argument("--rev", default="HEAD")
  args = parser.parse_args()
  commit = subprocess.run(["git", "-C", args.lakonlab, "rev-parse", args.rev], check=True, capture_output=True,
                          text=True).stdout.strip()
  arrays, meta = {}, {"lakonlab_commit": commit, "torch": torch.__version__, "diffusers": diffusers.__version__,
                      "layout": "channels last (B, H, W, C); trajectories (N, B, H, W, C) = states after each step",
                      "model": "x0 ~ N(mu, std^2) elementwise; exact velocity; cond = mu (pos) / mu_neg (neg)",
                      "cases": {}, "schedules": {}, "dynamic_shift": []}
  with tempfile.TemporaryDirectory() as tmp:
    FlowAdapterScheduler, guidance_jit, OklabColorEncoder, RGBColorEncoder = load_lakonlab(
        args.lakonlab, args.rev, pathlib.Path(tmp))
    encoders = {"rgb": RGBColorEncoder(), "oklab": OklabColorEncoder(use_affine_norm=True, mean=OKLAB_MEAN, std=OKLAB_STD)}

    dyn = make_scheduler(FlowAdapterScheduler, None)
    for h, w in SHIFT_SIZES:
      meta["dynamic_shift"].append({"height": h, "width": w, "seq_len": h * w, "shift": float(dyn.get_shift(h * w))})

    for n, spec in SCHEDULES:
      sched = make_scheduler(FlowAdapterScheduler, None if isinstance(spec, tuple) else spec)
      seq_len = spec[0] * spec[1] if isinstance(spec, tuple) else None
      sched.set_timesteps(n, seq_len=seq_len)
      name = f"n{n}_" + (f"{spec[0]}x{spec[1]}" if seq_len else f"shift{spec:g}")
      meta["schedules"][name] = {"num_steps": n, "shift": None if seq_len else spec, "height": spec[0] if seq_len else None,
                                 "width": spec[1] if seq_len else None}
      arrays[f"sched/{name}/sigmas"] = sched.sigmas.numpy()
      arrays[f"sched/{name}/solver_sigmas"] = sched.base_scheduler.sigmas.numpy()
      arrays[f"sched/{name}/timesteps"] = sched.timesteps.numpy()

    gen = torch.Generator().manual_seed(0)
    std = 0.5
    for name, (h, w), n, shift, g, orth, enc, mu_scale in CASES:
      shape = (2, 3, h, w)
      noise = torch.randn(shape, generator=gen)
      mu_pos = mu_scale * torch.randn(shape, generator=gen)
      mu_neg = 0.3 * torch.randn(shape, generator=gen)
      sched = make_scheduler(FlowAdapterScheduler, shift)
      traj = run_pipeline_loop(sched, guidance_jit, encoders.get(enc), noise, mu_pos, mu_neg, std, num_steps=n,
                               guidance=g, orthogonal=orth, clamp_denoised=enc is not None)
      if g <= 1 and shift is not None:   # unguided: bare diffusers must agree bitwise
        bare = run_bare_diffusers(noise, mu_pos, std, num_steps=n, shift=shift)
        if not torch.equal(bare, traj):
          raise SystemExit(f"{name}: bare diffusers UniPC differs from FlowAdapter by {(bare - traj).abs().max()}")
      assert torch.isfinite(traj).all(), name
      meta["cases"][name] = {"num_steps": n, "shift": shift, "guidance": g, "orthogonal": orth, "clamp": enc,
                             "std": std, "shape_nhwc": [2, h, w, 3]}
      arrays[f"{name}/noise"] = nhwc(noise)
      arrays[f"{name}/mu"] = nhwc(mu_pos)
      arrays[f"{name}/mu_neg"] = nhwc(mu_neg)
      arrays[f"{name}/trajectory"] = nhwc(traj)

  OUT.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(OUT / "unipc_flow.npz", **arrays)
  (OUT / "unipc_flow.json").write_text(json.dumps(meta, indent=1) + "\n")
  print(f"wrote {OUT / 'unipc_flow.npz'} ({(OUT / 'unipc_flow.npz').stat().st_size} bytes) and unipc_flow.json")


if __name__ == "__main__":
  main()
