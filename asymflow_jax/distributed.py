"""Multi-process (multi-host) start-up: ``jax.distributed`` initialisation and cross-process checks.

One JAX process per host (TPU VM worker, GPU node) owns all of that host's accelerators; the
processes find each other through a coordinator (process 0's ``host:port``)::

    from asymflow_jax import distributed
    distributed.define_flags()                    # --coordinator_address --num_processes --process_id
    ...
    distributed.initialize_from_flags()           # first thing in main(), before any other JAX call
    distributed.check_config_agreement(config)    # every process runs the same experiment

:func:`initialize` decides, in this order:

1. explicit arguments (or ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``
   in the environment) -> ``jax.distributed.initialize`` with exactly those values;
2. a managed cluster that JAX detects itself -- SLURM (``SLURM_JOB_ID`` ... ``SLURM_LOCALID``),
   a Cloud TPU VM pod (libtpu + TPU device files or ``TPU_WORKER_HOSTNAMES``/``TPU_WORKER_ID``),
   Open MPI (``OMPI_MCA_orte_hnp_uri``) -> ``jax.distributed.initialize()`` with no coordinator;
3. otherwise: a plain single-process run, ``jax.distributed`` is not started.

``ASYMFLOW_DISTRIBUTED=0`` forces 3, ``=1`` forces 2. Calling :func:`initialize` again is a no-op.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
from typing import Sequence

import numpy as np

import jax
from jax.experimental import multihost_utils

_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID")

_initialized_by_us = False


# ------------------------------------------------------------------------------------ detection


def _in_slurm_step() -> bool:
  return all(v in os.environ for v in _SLURM_VARS)


def _on_tpu_vm() -> bool:
  """A Cloud TPU VM: libtpu is installed and TPU chips (or the pod env vars) are present."""
  if any(v in os.environ for v in _TPU_ENV_VARS):
    return True
  if importlib.util.find_spec("libtpu") is None:
    return False
  return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def detect_environment() -> str:
  """'explicit' | 'slurm' | 'tpu' | 'ompi' | 'single' (what :func:`initialize` would do)."""
  forced = os.environ.get("ASYMFLOW_DISTRIBUTED", "").strip().lower()
  if forced in ("0", "false", "no", "off"):
    return "single"
  if all(os.environ.get(v) for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
    return "explicit"
  if _in_slurm_step():
    return "slurm"
  if _on_tpu_vm():
    return "tpu"
  if "OMPI_MCA_orte_hnp_uri" in os.environ:
    return "ompi"
  if forced in ("1", "true", "yes", "on"):
    return "auto"
  return "single"


def _slurm_local_device_ids() -> list[int] | None:
  """With one SLURM task per node, that task owns every GPU of the node.

  JAX's SLURM detection otherwise restricts each process to the single GPU ``SLURM_LOCALID``
  (its one-process-per-GPU convention). ``JAX_LOCAL_DEVICE_IDS`` wins when set.
  """
  if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
    return None  # jax reads it itself
  per_node = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "")
  if per_node.split("(")[0] != "1":
    return None
  gpus = os.environ.get("SLURM_GPUS_ON_NODE") or os.environ.get("SLURM_GPUS_PER_NODE", "")
  gpus = gpus.split(":")[-1]  # e.g. 'h100:8'
  if gpus.isdigit() and int(gpus) > 0:
    return list(range(int(gpus)))
  visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
  if visible and all(v.strip().isdigit() for v in visible.split(",")):
    return list(range(len(visible.split(","))))
  return None


# ------------------------------------------------------------------------------------ initialize


def is_initialized() -> bool:
  return jax.distributed.is_initialized()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               *, initialization_timeout: int = 300) -> bool:
  """Starts ``jax.distributed`` when this is a multi-process run; returns whether it is running.

  Must be called before any other JAX computation or device query. Idempotent: a second call
  (with any arguments) returns immediately. ``coordinator_address`` is ``host:port`` of process
  0; on a loopback address the coordinator also binds only to loopback.
  """
  global _initialized_by_us
  if jax.distributed.is_initialized():
    return True
  explicit = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(explicit) and not all(explicit):
    raise ValueError("pass all of coordinator_address, num_processes and process_id, or none of them "
                     f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r}).")
  kwargs = dict(initialization_timeout=initialization_timeout)
  if all(explicit):
    num_processes, process_id = int(num_processes), int(process_id)
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes}).")
    if num_processes == 1 and local_device_ids is None:
      return False  # nothing to coordinate
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  else:
    env = detect_environment()
    if env == "single":
      return False
    if env == "explicit":
      coordinator_address = os.environ["JAX_COORDINATOR_ADDRESS"]
      kwargs.update(coordinator_address=coordinator_address,
                    num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                    process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif env == "slurm" and local_device_ids is None:
      local_device_ids = _slurm_local_device_ids()
  if local_device_ids is not None:
    kwargs["local_device_ids"] = local_device_ids
  if coordinator_address and coordinator_address.rsplit(":", 1)[0] in _LOOPBACK:
    kwargs["coordinator_bind_address"] = coordinator_address
  jax.distributed.initialize(**kwargs)
  _initialized_by_us = True
  return True


def shutdown():
  """Stops ``jax.distributed`` if :func:`initialize` started it."""
  global _initialized_by_us
  if _initialized_by_us and jax.distributed.is_initialized():
    jax.distributed.shutdown()
  _initialized_by_us = False


def is_primary() -> bool:
  """True on process 0 (the one that writes logs, metrics, caches and samples)."""
  return jax.process_index() == 0


# ----------------------------------------------------------------------------------------- flags


def define_flags(flag_values=None):
  """Defines --coordinator_address, --num_processes, --process_id (absl) once."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS if flag_values is None else flag_values
  if "coordinator_address" in fv:
    return
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for jax.distributed (unset: auto-detect SLURM / TPU pod, "
                      "else single process)", flag_values=fv)
  flags.DEFINE_integer("num_processes", None, "number of JAX processes (with --coordinator_address)",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None, "this process's index in [0, num_processes)", flag_values=fv)


def initialize_from_flags(flag_values=None) -> bool:
  """:func:`initialize` with the values of the flags from :func:`define_flags`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  fv = flags.FLAGS if flag_values is None else flag_values
  return initialize(fv.coordinator_address, fv.num_processes, fv.process_id)


# ------------------------------------------------------------------------------ config agreement


def config_hash(config, extra: dict | None = None) -> str:
  """sha256 of the config's sorted JSON (+ ``extra``, e.g. the workdir): what processes compare."""
  import json  # pylint: disable=import-outside-toplevel
  if hasattr(config, "to_json_best_effort"):
    text = config.to_json_best_effort(sort_keys=True)
  else:
    text = json.dumps(config, sort_keys=True, default=repr)
  if extra:
    text += "\n" + json.dumps(extra, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


def check_config_agreement(config, extra: dict | None = None) -> str:
  """Raises ValueError unless every process holds the same config (and ``extra``); returns the hash.

  ``extra`` is anything else that must agree, e.g. ``dict(workdir=workdir)``. A no-op (besides
  hashing) in a single-process run. Must be called by all processes (it is a collective).
  """
  digest = config_hash(config, extra)
  if jax.process_count() == 1:
    return digest
  local = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8).astype(np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(local))   # (num_processes, 32)
  hashes = [bytes(row.astype(np.uint8)).hex() for row in gathered.reshape(jax.process_count(), -1)]
  groups: dict[str, list[int]] = {}
  for i, h in enumerate(hashes):
    groups.setdefault(h, []).append(i)
  if len(groups) > 1:
    ref = hashes[0]
    differ = [i for i, h in enumerate(hashes) if h != ref]
    detail = "; ".join(f"processes {ps}: sha256 {h[:12]}" for h, ps in groups.items())
    raise ValueError(f"the experiment config differs across processes: processes {differ} disagree with "
                     f"process 0 ({detail}). Launch every process with the same --config file and "
                     "the same --config.* overrides.")
  return digest


def allgather_strings(local: str, bucket: int = 4096) -> list[str]:
  """Every process's string, in process order (a collective; every process must call it).

  The UTF-8 bytes are padded to a multiple of ``bucket`` so repeated calls reuse one compiled gather.
  """
  if jax.process_count() == 1:
    return [local]
  data = np.frombuffer(local.encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
  padded = np.zeros((-(-int(sizes.max()) // bucket) * bucket,), np.uint8)
  padded[:data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)
  return [bytes(row[:n]).decode() for row, n in zip(rows, sizes)]
