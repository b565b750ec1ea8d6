r"""Train (or resume, or finetune a converted workdir) from an experiment config.

    python -m asymflow_jax.train --config=configs/default.py --workdir=workdirs/default \
        [--config.model.rank=8 --config.batch_size=128 ...]

The loop is ``asymflow_jax.trainer.train``; this module is the command line: absl flags, the
multi-host start-up, SIGTERM -> save and exit 0 (single-process runs; multi-host runs use JAX's
preemption sync), and exit codes: 0 done or preempted, 1 a run error (message on stderr, after
the last checkpoint save has completed), 2 a bad config or flag, 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from asymflow_jax import checkpoint
from asymflow_jax import distributed
from asymflow_jax import trainer

_HELP = ("-h", "--help", "--helpshort", "--helpfull")


class _StopOnSigterm:
  """Turns SIGTERM into a flag the loop polls (single-process runs only: with several processes a
  Python handler would let one process leave while the others block in a collective, so JAX's own
  preemption sync decides there)."""

  def __init__(self, num_processes: int):
    self.requested = False
    if num_processes == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, *_):
    self.requested = True

  def __call__(self) -> bool:
    return self.requested


def main(argv):
  del argv
  if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  distributed.initialize_from_flags()  # before any other JAX call; no-op for a single process
  stop = _StopOnSigterm(jax.process_count())
  try:
    result = trainer.train(flags.FLAGS.config, flags.FLAGS.workdir, stop_requested=stop)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (FloatingPointError, checkpoint.CheckpointError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted: the last checkpoint save was completed before exiting.", file=sys.stderr)
    return 130
  print(f"{result.status} at step {result.step}; workdir {flags.FLAGS.workdir}", file=sys.stderr)
  return 0


def _cli():
  config_flags.DEFINE_config_file("config", None, "experiment config file, configs/X.py[:arg]", lock_config=True)
  flags.DEFINE_string("workdir", None, "run directory (local or any etils.epath path, e.g. gs://...)")
  distributed.define_flags()
  if any(a in _HELP for a in sys.argv[1:]):   # absl exits 1 after --help; a help request is not an error
    print(__doc__)
    print(flags.FLAGS.main_module_help() if "--helpfull" not in sys.argv else flags.FLAGS)
    sys.exit(0)
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, os.getcwd())  # configs/ imports `configs.common`
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl's parser, with an override of a config field that does not exist reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:   # ml_collections: unknown field in --config.a.b=v
    bad = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    detail = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    print(f"error: a --config.* override names a field that does not exist ({detail}); overrides given: "
          f"{', '.join(bad)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  _cli()
