"""One process of a (multi-process) tiny training job; dumps the final parameters from process 0.

    XLA_FLAGS=--xla_force_host_platform_device_count=K python tests/multiprocess_worker.py \
        --workdir W --steps S --out OUT.npz \
        [--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I] \
        [--hang_after_checkpoint STEP]   # after checkpoint STEP is committed: write a marker, sleep
        [--lr LR] [--check_only]         # config-agreement check only

:func:`emulated_make_pipeline` gives a single-process run the concatenation of the N per-process
pipelines (process 0's rows first), i.e. exactly the global batch that an N-process run assembles,
so the two runs can be compared number for number (tests/test_multiprocess.py patches it in).
``--hang_after_checkpoint`` lets a test SIGKILL the processes at a known point.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from asymflow_jax import distributed  # noqa: E402


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--out", default="")
  p.add_argument("--coordinator_address", default=None)
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--mesh", default="1,-1,1")
  p.add_argument("--hang_after_checkpoint", type=int, default=0)
  p.add_argument("--lr", type=float, default=None, help="override config.lr (config-agreement test)")
  p.add_argument("--check_only", action="store_true", help="stop after check_config_agreement")
  p.add_argument("--no_samples", action="store_true", help="no end-of-training sample grid (not compared)")
  return p.parse_args()


class _ConcatIterator:
  """Global batch of N emulated processes: per-process batches concatenated in process order."""

  def __init__(self, pipes):
    self._its = [iter(p) for p in pipes]

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return dict(parts=[it.get_state() for it in self._its])

  def set_state(self, state):
    for it, s in zip(self._its, state["parts"]):
      it.set_state(s)


class _ConcatPipeline:
  def __init__(self, pipes):
    self._pipes = pipes
    self.bad_records = pipes[0].bad_records

  def __iter__(self):
    return _ConcatIterator(self._pipes)


def emulated_make_pipeline(original, num: int):
  """``data.pipeline.make_pipeline`` of a single process that reads the global batch of ``num``
  processes (``original`` is the real one)."""
  def make_pipeline(config=None, *, process_index=None, process_count=None, **kw):
    if process_index is not None or process_count is not None:   # e.g. the PCA pass: unchanged
      return original(config, process_index=process_index, process_count=process_count, **kw)
    return _ConcatPipeline([original(config, process_index=i, process_count=num, **kw) for i in range(num)])
  return make_pipeline


def _hang_after(step, workdir):
  from asymflow_jax import checkpoint  # pylint: disable=import-outside-toplevel
  original = checkpoint.save_train

  def save_train(mngr, state, data_state, *, force=False):
    out = original(mngr, state, data_state, force=force)
    if int(state.step) == step:
      mngr.wait_until_finished()
      import jax  # pylint: disable=import-outside-toplevel
      with open(os.path.join(workdir, f"hang_{jax.process_index()}"), "w") as f:
        f.write(str(step))
      while True:   # the test kills us here
        time.sleep(3600)
    return out
  checkpoint.save_train = save_train


def main():
  args = _parse()
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

  import jax  # pylint: disable=import-outside-toplevel
  from asymflow_jax import sharding, trainer  # pylint: disable=import-outside-toplevel
  from tests import train_config  # pylint: disable=import-outside-toplevel

  if args.hang_after_checkpoint:
    _hang_after(args.hang_after_checkpoint, args.workdir)
  config = train_config.tiny_train_config(args.steps)
  if args.no_samples:
    config.sample.num_images = 0
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = (int(v) for v in args.mesh.split(","))
  if args.lr is not None:
    config.lr = args.lr
  digest = distributed.check_config_agreement(config)
  if args.check_only:
    print(f"CONFIG_OK {digest}", flush=True)
    return
  state = trainer.train(config, args.workdir, progress=False).state
  flat = {jax.tree_util.keystr(k): np.asarray(jax.device_get(v))
          for k, v in jax.tree_util.tree_leaves_with_path(_gather(state.params))}
  info = dict(process_index=jax.process_index(), process_count=jax.process_count(),
              device_count=jax.device_count(), local_device_count=jax.local_device_count(),
              step=int(state.step), config_sha256=digest,
              device_processes=[d.process_index for d in sharding.make_mesh(config.mesh).devices.flat])
  print("WORKER_INFO " + json.dumps(info), flush=True)
  if args.out and distributed.is_primary():
    np.savez(args.out, num_devices=jax.device_count(), num_processes=jax.process_count(), **flat)
  distributed.shutdown()


def _gather(tree):
  """Fully replicated host copies of a (possibly cross-process sharded) tree."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils.process_allgather(tree, tiled=True)


if __name__ == "__main__":
  main()
