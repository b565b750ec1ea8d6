"""Runs the real training CLI with a fault injected into the data iterator.

    python tests/fault_worker.py FAULT N -- --config=tests/train_config.py:6 --workdir=W [--config.x=...]

FAULT is what happens just before the N-th batch of this process is read: ``raise`` (a
RuntimeError, as a bad record would), ``interrupt`` (KeyboardInterrupt, as Ctrl-C), ``sigterm``
(SIGTERM to this process, as a preemption notice), ``nan_pixel`` (that batch's first pixel is NaN, as a
corrupt record that still decodes), or ``none``. :func:`faulty_make_pipeline` also serves in-process tests.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from asymflow_jax import train  # noqa: E402
from asymflow_jax.data import pipeline  # noqa: E402


class _Faulty:
  def __init__(self, it, fault, at):
    self._it, self._fault, self._at, self._n = it, fault, at, 0

  def __iter__(self):
    return self

  def __next__(self):
    self._n += 1
    if self._n == self._at:
      if self._fault == "raise":
        raise RuntimeError("injected bad record at batch %d" % self._n)
      if self._fault == "interrupt":
        raise KeyboardInterrupt
      if self._fault == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
      if self._fault == "nan_pixel":
        batch = dict(next(self._it))
        batch["image"] = np.array(batch["image"])
        batch["image"][0, 0, 0, 0] = np.nan
        return batch
    return next(self._it)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def faulty_make_pipeline(original, fault: str, at: int):
  """``data.pipeline.make_pipeline`` whose training stream has ``fault`` before its ``at``-th batch
  (``original`` is the real one; the PCA pass over the data is unchanged)."""
  def make_pipeline(*args, **kwargs):
    pipe = original(*args, **kwargs)
    if kwargs.get("num_epochs") is not None:   # the PCA pass over the data: unchanged
      return pipe
    dataset = pipe.dataset

    class _Dataset:
      def __iter__(self):
        return _Faulty(iter(dataset), fault, at)
    pipe.dataset = _Dataset()
    return pipe
  return make_pipeline


def main():
  fault, at = sys.argv[1], int(sys.argv[2])
  assert sys.argv[3] == "--"
  pipeline.make_pipeline = faulty_make_pipeline(pipeline.make_pipeline, fault, at)
  sys.argv = [sys.argv[0]] + sys.argv[4:]
  train._cli()  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
