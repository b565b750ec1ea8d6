"""Run logging: scalars to ``metrics.jsonl`` and TensorBoard, messages and a progress bar (process 0).

Paths go through ``etils.epath``, so a workdir may be ``gs://...`` (with ``gcsfs`` installed, or
TensorFlow). TensorBoard event files are written by tensorboardX to a local folder and, for a
remote workdir, copied to ``WORKDIR/tensorboard/`` after every write.
"""

from __future__ import annotations

import json
import sys
import tempfile

import jax
from etils import epath
import tqdm

METRICS_FILE = "metrics.jsonl"


def log(msg: str):
  """A message on stderr, from process 0 only."""
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def progress_bar(start: int, total: int, enabled: bool):
  """A tqdm bar on stderr (process 0), or None."""
  if not enabled or jax.process_index() != 0:
    return None
  return tqdm.tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


def read_metrics(workdir) -> list[dict]:
  path = epath.Path(workdir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class MetricWriter:
  """Scalars to ``metrics.jsonl`` (always) and TensorBoard (if tensorboardX imports), process 0 only.

  ``resume_step``: rows after it were written by a run that did not reach its next checkpoint; they
  are dropped so every step appears once (the resumed run writes them again).
  """

  def __init__(self, workdir, *, resume_step: int | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self._path = epath.Path(workdir) / METRICS_FILE
    self._rows: list[str] = []
    self._tb = None
    self._remote = "://" in str(workdir)
    self._tb_dir = epath.Path(workdir) / "tensorboard"
    if not self.enabled:
      return
    self._path.parent.mkdir(parents=True, exist_ok=True)
    if self._path.exists():
      kept = [json.dumps(r) for r in read_metrics(workdir) if resume_step is None or r.get("step", 0) <= resume_step]
      self._rows = kept
      self._path.write_text("".join(line + "\n" for line in kept))
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel  (optional)
        self._tb = SummaryWriter(tempfile.mkdtemp(prefix="asymflow_tb_") if self._remote else str(self._tb_dir))
      except ImportError:
        pass

  def write(self, step: int, scalars: dict):
    if not self.enabled or not scalars:
      return
    self._rows.append(json.dumps(dict(step=step, **scalars)))
    self._flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      if self._remote:
        self._tb.flush()
        self._sync_tensorboard()

  def _sync_tensorboard(self):
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    for f in epath.Path(self._tb.logdir).iterdir():
      (self._tb_dir / f.name).write_bytes(f.read_bytes())

  def _flush(self):
    # Append where the filesystem can; object stores (gs://) have no append, so rewrite the object.
    if "://" in str(self._path):
      self._path.write_text("".join(line + "\n" for line in self._rows))
    else:
      with self._path.open("a") as f:
        f.write(self._rows[-1] + "\n")

  def close(self):
    if self._tb is not None:
      self._tb.close()
      if self._remote:
        self._sync_tensorboard()
      self._tb = None
