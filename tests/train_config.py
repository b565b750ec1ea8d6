"""A training config small enough to compile in seconds on a 2-core CPU, and a comparison of two runs."""

import numpy as np

from configs import default
from tests.conftest import FIXTURES

DINOV2_TINY = FIXTURES / "dinov2_tiny_hf" / "plain"   # tests/make_dinov2_fixture.py's plain variant


def tiny_train_config(num_steps: int = 4, repa: bool = False):
  """The tiny AsymJiT run (D = 16, rank 4, 2 blocks, in-context tokens from block 1). ``repa``: plus
  REPA after block 1 (where the in-context tokens are present and must be dropped) against the tiny
  random DINOv2 fixture (patch 4, run on the 8 x 8 token grid: 32 px, interpolated position embeddings)."""
  c = default.get_config()
  m = c.model
  m.patch_size, m.rank = 4, 4   # D = 16
  m.hidden_size, m.depth, m.num_heads, m.bottleneck_dim = 32, 2, 2, 16
  m.in_context_len, m.in_context_start = 2, 1
  c.batch_size = 8
  c.num_steps = num_steps
  c.warmup_steps = 2
  c.log_every = 1
  c.steps_per_call = 1   # every step is logged (tests of steps_per_call set their own)
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.subspace.num_images = 200
  # the end-of-training sample grid that every run writes: one image per class, 2 Heun steps with
  # CFG (the default config's 100 images x 20 steps cost ~10 s per run on 2 CPU cores)
  c.sample.num_images = 10
  c.sample.num_steps = 2
  if repa:
    c.repa.weight, c.repa.block, c.repa.projector_dim = 0.5, 1, 16
    c.repa.encoder, c.repa.encoder_path, c.repa.encoder_dtype = "dinov2_tiny", str(DINOV2_TINY), "float32"
  return c


def max_rel_diff(a_leaves, b_leaves) -> float:
  """The largest max|a - b| / max|a| over pairs of arrays (two runs' parameter leaves)."""
  return max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in zip(a_leaves, b_leaves, strict=True))


def get_config(arg: str | None = None):
  """``--config=tests/train_config.py:STEPS[,repa]`` for the command-line tests."""
  steps, _, repa = (arg or "4").partition(",")
  return tiny_train_config(int(steps), repa=repa == "repa")
