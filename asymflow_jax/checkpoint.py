"""The workdir format and checkpoints: one layout for train, sample, evaluate and convert.

A workdir (a local path or any ``etils.epath`` path such as ``gs://bucket/run``)::

    config.json            the experiment config (written once; a resume is compared against it)
    checkpoints/<step>/    one orbax step folder per checkpoint, with the items
        params             the parameter tree
        ema_<i>            EMA tree i, one per ``config.ema_decays``   (absent in converted workdirs)
        opt_state          the optimizer state                       (absent in converted workdirs)
        train_meta         {step, rng, nonfinite_step, nonfinite_kind}   (converted: {step})
        subspace           {basis (D, r), scale}   (the basis is left out for r = 0 and rebuilt)
        data               JSON: every process's data-iterator state and the skipped-record count
        checks             JSON: a uint32 fingerprint per leaf of every array item
    metrics.jsonl, tensorboard/, samples/    written by training and sampling

Sampling and evaluation restore only ``params`` or one ``ema_<i>`` plus ``subspace`` (orbax
restores the named items and never reads the others), so an H/16 inference restore reads ~4 GB,
not the ~15 GB of the training state. Training restores everything it finds; a converted
workdir (params only) starts its optimizer and EMA fresh, which is how finetuning starts.

Integrity: every restored array is checked against the fingerprint written with it (the wrap-around
uint32 sum of its bits: any single flipped bit changes it) and for finiteness. A step that fails
to read or verify is reported, and training falls back to the newest step that verifies; the bad
newer steps are moved to ``WORKDIR/corrupt_checkpoints/`` (never deleted). If no step verifies
the run stops naming every step and its error, and nothing is moved.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from etils import epath
import ml_collections
import orbax.checkpoint as ocp

from asymflow_jax import config as config_lib
from asymflow_jax import experiment
from asymflow_jax.metric_log import log
from asymflow_jax import sharding as shd
from asymflow_jax import subspace as subspace_lib

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


# ------------------------------------------------------------------------------------- config.json


def config_path(workdir) -> epath.Path:
  return epath.Path(workdir) / CONFIG_FILE


def read_config(workdir) -> ml_collections.ConfigDict:
  """The stored experiment config of a workdir (FileNotFoundError naming the path if absent)."""
  path = config_path(workdir)
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {str(workdir)!r} is not a workdir (train or convert writes one).")
  return config_lib.with_defaults(_tuples(json.loads(path.read_text())))


def _tuples(node):
  """JSON lists back to tuples (configs hold tuples, e.g. ema_decays and sample.interval)."""
  if isinstance(node, dict):
    return {k: _tuples(v) for k, v in node.items()}
  if isinstance(node, list):
    return tuple(_tuples(v) for v in node)
  return node


def write_config(workdir, config):
  """Writes config.json (process 0; the parent folder is created)."""
  if jax.process_index() == 0:
    path = config_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def check_resume_config(workdir, config):
  """Before anything is written: a workdir that already holds a config must hold a compatible one.

  Structural differences (model architecture or rank, number of EMA trees, clipping on/off)
  stop with a message naming each field; the stored config.json is left untouched. Other
  differences (e.g. num_steps, lr) are allowed and listed.
  """
  if not config_path(workdir).exists():
    return []
  stored = json.loads(config_path(workdir).read_text())
  new = json.loads(config.to_json_best_effort())
  diff = config_lib.structural_diff(stored, new)
  if diff:
    raise ValueError(f"the config does not match the one stored in {config_path(workdir)} (the checkpoints there "
                     "were written with it):\n  " + "\n  ".join(diff) +
                     "\nUse a new --workdir, or pass the stored values to resume this run.")
  return sorted(_flat_diff(stored, new))


def _flat_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      out.extend(_flat_diff(va, vb, f"{prefix}{key}."))
    elif va != vb:
      out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
  return out


# ------------------------------------------------------------------------------------ fingerprints


def _as_uint32(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:   # bitcast_convert_type refuses bool
    x = x.astype(jnp.uint8)
  bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  u = jax.lax.bitcast_convert_type(x, bits)
  return u.astype(jnp.uint32)


@jax.jit
def _fingerprints_and_finite(items):
  sums = {name: [jnp.sum(_as_uint32(x), dtype=jnp.uint32) for x in jax.tree.leaves(tree)]
          for name, tree in items.items()}
  finite = {name: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                                       if jnp.issubdtype(x.dtype, jnp.floating)] or [True]))
            for name, tree in items.items()}
  return sums, finite


def fingerprints(items: dict) -> tuple[dict[str, list[int]], dict[str, bool]]:
  """Per item and leaf, the wrap-around uint32 sum of its bits (independent of the sharding, and
  changed by any single flipped bit), and per item whether every float is finite. One jitted
  reduction over all items; plain ints and bools (JSON-able)."""
  sums, finite = jax.device_get(_fingerprints_and_finite(items))
  return ({name: [int(v) for v in values] for name, values in sums.items()},
          {name: bool(v) for name, v in finite.items()})


# ------------------------------------------------------------------------------------ the manager


def checkpoint_dir(workdir) -> epath.Path:
  path = epath.Path(workdir) / CHECKPOINT_DIR
  return path if "://" in str(workdir) else path.absolute()


def manager(workdir, config, *, read_only: bool = False) -> ocp.CheckpointManager:
  """The workdir's CheckpointManager: retention ``checkpoint.keep`` newest plus every
  ``checkpoint.keep_every``-th; the train loop decides when to save."""
  c = config.checkpoint
  options = ocp.CheckpointManagerOptions(
      max_to_keep=c.keep, keep_period=c.keep_every or None, save_interval_steps=1,
      enable_async_checkpointing=c.async_save and not read_only, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def _items(state: experiment.TrainState) -> dict[str, Any]:
  items = dict(params=state.params, opt_state=state.opt_state,
               train_meta=dict(step=state.step, rng=state.rng, nonfinite_step=state.nonfinite_step,
                               nonfinite_kind=state.nonfinite_kind),
               subspace=_subspace_item(state.basis, state.scale))
  items.update({f"ema_{i}": tree for i, tree in enumerate(state.ema)})
  return items


def _subspace_item(basis, scale) -> dict:
  """Orbax cannot store zero-size arrays: a rank-0 basis (D, 0) is left out and rebuilt on restore."""
  return dict(scale=scale) if basis.shape[-1] == 0 else dict(basis=basis, scale=scale)


def _save_items(mngr, step: int, items: dict, data: dict, *, force: bool) -> bool:
  args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
  checks, _ = fingerprints(items)
  return mngr.save(step, args=ocp.args.Composite(**args, data=ocp.args.JsonSave(data),
                                                 checks=ocp.args.JsonSave(checks)), force=force)


def save_train(mngr, state: experiment.TrainState, data_state: dict, *, force: bool = False) -> bool:
  """Saves the whole train state (async if configured). Refuses a state with a skipped
  non-finite update: such a state is never written."""
  if int(state.nonfinite_step) >= 0:
    raise FloatingPointError(f"non-finite {experiment.describe_nonfinite(state.nonfinite_kind)} at step "
                             f"{int(state.nonfinite_step)}; not writing a checkpoint from this state.")
  return _save_items(mngr, int(state.step), _items(state), data_state, force=force)


def save_converted(workdir, config, params, basis, scale):
  """Writes a workdir (config.json + checkpoint step 0 with params and subspace) from converted
  weights; sample/evaluate open it, train finetunes from it."""
  write_config(workdir, config)
  mngr = manager(workdir, config)
  try:
    items = dict(params=params, train_meta=dict(step=jnp.zeros((), jnp.int32)),
                 subspace=_subspace_item(jnp.asarray(basis, jnp.float32), jnp.asarray(scale, jnp.float32)))
    _save_items(mngr, 0, items, {}, force=True)
    mngr.wait_until_finished()
  finally:
    mngr.close()


# ------------------------------------------------------------------------------------------ restore


class CheckpointError(RuntimeError):
  """A step could not be read or did not verify."""


def _step_items(mngr, step: int) -> set[str]:
  path = epath.Path(mngr.directory) / str(step)
  return {p.name for p in path.iterdir()} if path.exists() else set()


def _restore_items(mngr, step: int, targets: dict[str, Any]) -> dict[str, Any]:
  """Restores exactly the named items (and the JSON ``checks``) and verifies each against its
  fingerprint and for finite values."""
  present = _step_items(mngr, step)
  missing = sorted(set(targets) - present)
  if missing:
    raise CheckpointError(f"step {step} has no item(s) {missing} (it has {sorted(present)}).")
  args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
  if "checks" in present:
    args["checks"] = ocp.args.JsonRestore()
  try:
    out = mngr.restore(step, args=ocp.args.Composite(**args))
  except (KeyboardInterrupt, SystemExit):
    raise
  except Exception as e:  # orbax/tensorstore raise many kinds; the message says what
    raise CheckpointError(f"step {step} could not be read: {type(e).__name__}: {str(e)[:500]}") from e
  checks = out["checks"] if "checks" in present else {}
  restored = {name: out[name] for name in targets}
  sums, finite = fingerprints(restored)
  for name, tree in restored.items():
    if name in checks and sums[name] != list(checks[name]):
      bad = [jax.tree_util.keystr(path) for (path, _), got, want in
             zip(jax.tree_util.tree_leaves_with_path(tree), sums[name], checks[name]) if got != want]
      raise CheckpointError(f"step {step}: item {name!r} does not match the fingerprint written with it "
                            f"(corrupted data in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}).")
    if not finite[name]:
      raise CheckpointError(f"step {step}: item {name!r} holds NaN or Inf values.")
  return restored


def _subspace_target(abstract, shardings) -> dict:
  basis = jax.ShapeDtypeStruct(abstract.basis.shape, abstract.basis.dtype, sharding=shardings.basis)
  scale = jax.ShapeDtypeStruct(abstract.scale.shape, abstract.scale.dtype, sharding=shardings.scale)
  return _subspace_item(basis, scale)


def _restored_basis(item: dict, abstract, shardings):
  if "basis" in item:
    return item["basis"]
  return jax.device_put(jnp.zeros(abstract.basis.shape, abstract.basis.dtype), shardings.basis)


def _restore_train_step(mngr, exp: experiment.Experiment, step: int, frozen=None):
  target = exp.target()
  present = _step_items(mngr, step)
  wanted = dict(params=target.params, subspace=_subspace_target(exp.abstract, exp.shardings))
  full = "opt_state" in present
  if full:
    wanted["opt_state"] = target.opt_state
    wanted["train_meta"] = dict(step=target.step, rng=target.rng, nonfinite_step=target.nonfinite_step,
                                nonfinite_kind=target.nonfinite_kind)
    wanted.update({f"ema_{i}": tree for i, tree in enumerate(target.ema)})
  r = _restore_items(mngr, step, wanted)
  basis = _restored_basis(r["subspace"], exp.abstract, exp.shardings)
  if full:
    meta = r["train_meta"]
    state = experiment.TrainState(step=meta["step"], params=r["params"], opt_state=r["opt_state"],
                                  ema=tuple(r[f"ema_{i}"] for i in range(len(target.ema))), rng=meta["rng"],
                                  basis=basis, scale=r["subspace"]["scale"], nonfinite_step=meta["nonfinite_step"],
                                  nonfinite_kind=meta["nonfinite_kind"], frozen=frozen)
    data = mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] if "data" in present else {}
    return state, data or {}
  if experiment.finetuning(exp.config):
    raise CheckpointError(f"step {step} holds weights only; a finetuning workdir's steps hold the full train state.")
  # Converted weights: a fresh optimizer and EMA around the given parameters, the stored subspace.
  sub = subspace_lib.Subspace(basis=np.asarray(jax.device_get(basis)), patch_size=exp.config.model.patch_size,
                              scale=float(jax.device_get(r["subspace"]["scale"])))
  log(f"step {step} holds weights only (a converted checkpoint): starting a fresh optimizer and EMA from them")
  return exp.init_state(sub, params=r["params"], frozen=frozen), {}


def restore_train(workdir, mngr, exp: experiment.Experiment, frozen=None):
  """(state, data_state) from the newest step that reads and verifies, or None if there is no step.

  A finetuning run passes its ``frozen`` networks (the checkpoint holds only the trained tree).

  Newer steps that fail are reported and moved to ``WORKDIR/corrupt_checkpoints/`` so that training
  can write those step numbers again; if no step verifies, raises CheckpointError naming each
  step and its error (nothing is moved).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  for step in steps:
    try:
      state, data = _restore_train_step(mngr, exp, step, frozen)
    except CheckpointError as e:
      log(f"WARNING: checkpoint {e}")
      errors.append(str(e))
      continue
    if errors:
      bad = steps[:len(errors)]
      _quarantine(workdir, bad)
      mngr.reload()
      log(f"WARNING: resuming from step {step}, the newest checkpoint that verifies; steps {bad} were moved to "
          f"{epath.Path(workdir) / CORRUPT_DIR}.")
    return state, data
  raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)} could be restored:\n  " + "\n  ".join(errors) +
                        f"\nIf the data is damaged, move the bad step folders out of {checkpoint_dir(workdir)} "
                        "(the run then starts over), or restore them from a copy.")


def _quarantine(workdir, steps):
  if jax.process_index() == 0:
    dest = epath.Path(workdir) / CORRUPT_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for step in steps:
      src = checkpoint_dir(workdir) / str(step)
      target = dest / str(step)
      n = 1
      while target.exists():
        target, n = dest / f"{step}.{n}", n + 1
      src.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("asymflow_quarantine")


def open_workdir(workdir, *, step: int | None = None, weights: str = "ema_0", mesh=None):
  """(config, experiment, InferenceState) of a workdir for sampling/evaluation.

  Restores only ``weights`` ("params" or "ema_<i>"; a converted workdir has only "params", which
  is then used) and the subspace, on all local devices (``mesh`` default: fsdp over every device).
  A finetuning workdir holds only its trained tree: it is restored onto the base workdir's weights
  (``finetune.base``, ``finetune.weights``) and the LoRA adapters are folded in, so the returned
  parameters are always a plain, complete tree.
  """
  config = read_config(workdir)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1  # sample on whatever devices are here
  mesh = shd.make_mesh(config.mesh) if mesh is None else mesh
  exp = experiment.build(config, mesh, training=False)
  mngr = manager(workdir, config, read_only=True)
  try:
    steps = mngr.all_steps()
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}.")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f"--step={step}: the workdir has checkpoints at steps {sorted(steps)}.")
    present = _step_items(mngr, step)
    if weights not in present:
      if weights == "ema_0" and "params" in present:
        weights = "params"   # converted weights: there is no EMA
      else:
        have = sorted(n for n in present if n == "params" or n.startswith("ema_"))
        raise ValueError(f"step {step} has no {weights!r} weights; it has {have}.")
    finetuned = experiment.finetuning(config)
    target = experiment.checkpoint_params_target(exp)
    r = _restore_items(mngr, step, {weights: target, "subspace": _subspace_target(exp.abstract, exp.shardings)})
  finally:
    mngr.close()
  params = r[weights]
  if finetuned:
    base = open_workdir(config.finetune.base, weights=config.finetune.weights, mesh=mesh)[2]
    merge = jax.jit(lambda b, t: experiment.inference_params(config, t, dict(params=b)),
                    out_shardings=exp.shardings.params)
    params = merge(base.params, params)
  else:
    params = experiment.inference_params(config, params)
  state = experiment.InferenceState(step=jnp.asarray(step, jnp.int32), params=params,
                                    basis=_restored_basis(r["subspace"], exp.abstract, exp.shardings),
                                    scale=r["subspace"]["scale"])
  return config, exp, state
