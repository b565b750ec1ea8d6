"""A training config small enough to compile in seconds on a 2-core CPU."""

from configs import default


def tiny_train_config(num_steps: int = 4):
  c = default.get_config()
  m = c.model
  m.patch_size, m.rank = 4, 4   # D = 16
  m.hidden_size, m.depth, m.num_heads, m.bottleneck_dim = 32, 2, 2, 16
  m.in_context_len, m.in_context_start = 2, 1
  c.batch_size = 8
  c.num_steps = num_steps
  c.warmup_steps = 2
  c.log_every = 1
  c.checkpoint.every = 2
  c.checkpoint.async_save = False
  c.subspace.num_images = 200
  # the end-of-training sample grid that every run writes: one image per class, 2 Heun steps with
  # CFG (the default config's 100 images x 20 steps cost ~10 s per run on 2 CPU cores)
  c.sample.num_images = 10
  c.sample.num_steps = 2
  return c


def get_config(arg: str | None = None):
  """``--config=tests/train_config.py:STEPS`` for the command-line tests."""
  return tiny_train_config(int(arg) if arg else 4)
