"""The training loop: one readable function that runs or resumes a run in a workdir.

    result = trainer.train(config, workdir)        # TrainResult(state, status, step)

Order of work: validate the config and every file it names; compare it with the workdir's stored
config (a structural change stops here, before anything is written); build the sharded experiment;
restore the newest checkpoint that verifies (or make the subspace and a fresh state); then per
device call (one step, or ``config.steps_per_call`` steps between log/checkpoint/eval/sample
steps): global batch(es) -> jitted ``train_step`` (``train_steps``) -> metrics, checkpoints,
samples, evaluation.

Faults: any exception or Ctrl-C inside the loop first waits for the in-flight async checkpoint and
closes the checkpoint manager, then propagates unchanged, so no finished checkpoint is lost and
the real error is the one reported. ``stop_requested()`` (the CLI sets it on SIGTERM) or JAX's
multi-host preemption notice ends the run after a forced save with status ``"preempted"``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

import numpy as np

import jax
from etils import epath

from asymflow_jax import checkpoint
from asymflow_jax import config as config_lib
from asymflow_jax import distributed
from asymflow_jax import experiment
from asymflow_jax import image_io
from asymflow_jax import objective
from asymflow_jax import sampling
from asymflow_jax import scoring
from asymflow_jax import sharding as shd
from asymflow_jax import subspace as subspace_lib
from asymflow_jax import t2i_sampling
from asymflow_jax.data import pipeline as data_pipeline
from asymflow_jax.data import t2i
from asymflow_jax.models import backbone
from asymflow_jax.metric_log import MetricWriter, log, progress_bar

COMPLETED, PREEMPTED = "completed", "preempted"


@dataclasses.dataclass
class TrainResult:
  state: experiment.TrainState
  status: str        # COMPLETED | PREEMPTED
  step: int


def _data_state(iterator, pipe) -> dict:
  """Every process's iterator state and skipped-record count (a collective)."""
  local = json.dumps(dict(iterator=iterator.get_state(), bad_records=pipe.bad_records.count))
  states = [json.loads(s) for s in distributed.allgather_strings(local)]
  return dict(process_count=len(states), iterators=[s["iterator"] for s in states],
              bad_records=int(sum(s["bad_records"] for s in states)))


def _restore_iterator(iterator, data: dict):
  states = data.get("iterators") or []
  if not states:
    if data:   # converted weights have no data state at all: nothing to warn about
      log("WARNING: the checkpoint holds no data-iterator state; the data order restarts.")
  elif data.get("process_count") != jax.process_count():
    log(f"WARNING: the checkpoint's data state is from {data.get('process_count')} processes, this run has "
        f"{jax.process_count()}: the data order restarts (the model state is restored exactly).")
  else:
    iterator.set_state(states[jax.process_index()])


def _sample_images(state, exp, num: int, seed: int) -> np.ndarray:
  """uint8 EMA samples on every process: class-balanced (sampler and CFG from ``config.sample``), or
  for a text-to-image model the prompts of the first ``num`` training records (CFG against the
  dataset's empty prompt)."""
  params = experiment.inference_params(exp.config, state.ema[0], state.frozen)
  config = exp.config
  if backbone.is_text(exp.model):
    source = t2i.T2ISource(config.data.path)
    n = min(num, len(source))
    prompts = np.stack([source[i]["prompt_embeds"] for i in range(n)])
    return t2i_sampling.generate_t2i(exp.model, params, state.basis, state.scale, prompts,
                                     source.empty_prompt_embeds, sample_config=config.sample, seed=seed,
                                     height=config.model.input_size, width=config.model.input_size,
                                     color_space=config.model.color_space)
  return sampling.generate_from_config(exp.model, params, state.basis, state.scale, exp.mesh,
                                       sample_config=config.sample, num=num, seed=seed,
                                       color_space=config.model.color_space)


def write_sample_grid(state, exp, path) -> np.ndarray:
  """A PNG grid of ``config.sample.num_images`` EMA samples (one class per column); returns them."""
  images = _sample_images(state, exp, exp.config.sample.num_images, exp.config.seed + 1)
  if jax.process_index() == 0:
    n = images.shape[0]
    classes = 0 if backbone.is_text(exp.model) else exp.model.config.num_classes
    image_io.save_png(path, images, cols=classes if classes and n % classes == 0 else None,
                      upscale=max(1, 128 // exp.config.model.input_size))
  return images


def _scalars(metrics, n_images: int, seconds: float, skipped: int) -> dict:
  scalars = dict(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]), lr=float(metrics["lr"]),
                 img_per_s=n_images / max(seconds, 1e-9), skipped_records=skipped)
  scalars.update({k: float(v) for k, v in metrics.get("terms", {}).items()})
  edges = objective.SIGMA_BUCKETS
  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
    if metrics["count_by_sigma"][i] > 0:
      scalars[f"loss_sigma_{lo:.2f}_{hi:.2f}"] = float(metrics["loss_by_sigma"][i])
  return scalars


def train(config, workdir, *, progress: bool = True, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
  """Runs (or resumes) training in ``workdir``; returns the final state and how the run ended."""
  config_lib.validate_config(config, jax.device_count(), jax.process_count())
  distributed.check_config_agreement(config, dict(workdir=str(workdir)))
  changed = checkpoint.check_resume_config(workdir, config)
  if changed:
    log("resuming with changed settings: " + "; ".join(changed))
  e = config.eval
  scorer = (scoring.make_scorer(e.metric, inception=e.inception or None, reference=e.reference or None,
                                classifier_cache=str(epath.Path(workdir) / "digit_classifier.msgpack"),
                                num_images=e.num_images) if e.every else None)
  mesh = shd.make_mesh(config.mesh)
  exp = experiment.build(config, mesh, training=True)
  pipe = data_pipeline.make_pipeline(config.data, seed=config.seed, global_batch_size=config.batch_size)
  iterator = iter(pipe)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mngr = checkpoint.manager(workdir, config)
  try:
    frozen, base_sub = _load_base(config, exp) if experiment.finetuning(config) else (None, None)
    if experiment.repa_enabled(config):   # the frozen encoder, streamed into its shardings
      frozen = {**(frozen or {}), experiment.REPA_ENCODER: experiment.load_repa_encoder(
          config, exp.shardings.frozen[experiment.REPA_ENCODER])}
    restored = checkpoint.restore_train(workdir, mngr, exp, frozen=frozen)
    if restored is not None:
      state, data = restored
      _restore_iterator(iterator, data)
      log(f"resumed from step {int(state.step)}")
    else:
      state = exp.init_state(base_sub if base_sub is not None else experiment.make_subspace(config), frozen=frozen)
    checkpoint.write_config(workdir, config)
    result = _loop(state, exp, workdir, mngr, pipe, iterator, scorer, progress, stop_requested or (lambda: False))
    mngr.wait_until_finished()
  except BaseException:
    _finish_saves(mngr)
    raise
  mngr.close()
  return result


def _load_base(config, exp):
  """(frozen networks in their shardings, subspace) of a finetuning run, from ``finetune.base``."""
  base_config = checkpoint.read_config(config.finetune.base)
  diff = [d for d in config_lib.structural_diff(base_config.to_dict(), config.to_dict()) if d.startswith("model.")]
  if diff:
    raise ValueError(f"the model of config.finetune.base={config.finetune.base!r} differs from this config's:\n  "
                     + "\n  ".join(diff))
  _, _, base = checkpoint.open_workdir(config.finetune.base, weights=config.finetune.weights, mesh=exp.mesh)
  sub = subspace_lib.Subspace(basis=np.asarray(jax.device_get(base.basis)), patch_size=config.model.patch_size,
                              scale=float(jax.device_get(base.scale)))
  log(f"finetuning from {config.finetune.base} ({config.finetune.weights}, step {int(base.step)}); "
      f"subspace rank {sub.rank}, scale {sub.scale:.4g}")
  return jax.device_put(experiment.frozen_networks(config, base.params), exp.shardings.frozen), sub


def _finish_saves(mngr):
  """On the way out of an error: let the last async save complete, then close the manager."""
  try:
    mngr.wait_until_finished()
  except Exception as err:  # the original error matters more; report this one briefly
    log(f"WARNING: the last checkpoint save did not complete: {type(err).__name__}: {err}")
  try:
    mngr.close()
  except Exception:  # pylint: disable=broad-except
    pass


def _cadences(config, scorer) -> list[int]:
  """The periods (in steps) of everything that happens between steps: log, checkpoint, eval, samples."""
  every = [config.log_every, config.checkpoint.every]
  if scorer is not None:
    every.append(config.eval.every)
  if config.sample.num_images and config.sample.every:
    every.append(config.sample.every)
  return every


def _call_length(step: int, config, cadences: list[int]) -> int:
  """Steps the next device call runs: ``config.steps_per_call`` when it ends by ``num_steps`` and no
  log/checkpoint/eval/sample step falls strictly inside it, else 1."""
  k = config.steps_per_call
  inside = range(step + 1, step + k)
  if k > 1 and step + k <= config.num_steps and not any(d % n == 0 for d in inside for n in cadences):
    return k
  return 1


def _loop(state, exp, workdir, mngr, pipe, iterator, scorer, progress, stop_requested) -> TrainResult:
  config = exp.config
  step_fns = {1: objective.jit_train_step(exp)}
  if config.steps_per_call > 1:
    step_fns[config.steps_per_call] = objective.jit_train_step(exp, config.steps_per_call)
  cadences = _cadences(config, scorer)
  if config.steps_per_call > min(cadences):
    log(f"WARNING: config.steps_per_call={config.steps_per_call} never applies: a log, checkpoint, eval or sample "
        f"step (every {min(cadences)}) falls inside every call of that length, so each call runs one step.")
  start = int(state.step)
  writer = MetricWriter(workdir, resume_step=start)
  bar = progress_bar(start, config.num_steps, progress)
  t0, n_images, reported_skips = time.time(), 0, 0
  step = start
  try:
    while step < config.num_steps:
      k = _call_length(step, config, cadences)
      if k == 1:
        state, metrics = step_fns[1](state, shd.global_batch(next(iterator), exp.mesh))
      else:
        local = [next(iterator) for _ in range(k)]
        batches = shd.global_batch({key: np.stack([b[key] for b in local]) for key in local[0]}, exp.mesh,
                                   stacked_steps=True)
        state, metrics = step_fns[k](state, batches)
      n_images += k * config.batch_size
      step = done = step + k
      if done % config.log_every == 0 or done == config.num_steps:
        metrics = jax.device_get(metrics)
        if k > 1:   # stacked per step: the last step's are the ones logged
          metrics = jax.tree.map(lambda m: m[-1], metrics)
        if int(state.nonfinite_step) >= 0:
          raise FloatingPointError(
              f"non-finite {experiment.describe_nonfinite(state.nonfinite_kind)} at step {int(state.nonfinite_step)} "
              f"(loss {metrics['loss']}, gradient norm {metrics['grad_norm']}); that update was skipped and no "
              f"checkpoint was written after it (latest: step {mngr.latest_step()}).")
        skipped = pipe.bad_records.count   # process 0's; the checkpoint's data item holds the total
        if skipped > reported_skips:
          log(f"step {done}: {skipped} bad records skipped so far on process 0 (data.on_bad_record=skip); "
              f"last: {pipe.bad_records.last_error}")
          reported_skips = skipped
        scalars = _scalars(metrics, n_images, time.time() - t0, skipped)
        writer.write(done, scalars)
        if bar is not None:
          bar.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['img_per_s']:.1f}")
        t0, n_images = time.time(), 0
      if bar is not None:
        bar.update(k)
      # JAX's preemption sync point is a step number, so every step of the call is reported
      preempted = [mngr.reached_preemption(d) for d in range(done - k + 1, done + 1)]
      if stop_requested() or any(preempted):
        checkpoint.save_train(mngr, state, _data_state(iterator, pipe), force=True)
        mngr.wait_until_finished()
        log(f"preempted: saved step {done}")
        return TrainResult(state, PREEMPTED, done)
      if done % config.checkpoint.every == 0 or done == config.num_steps:
        checkpoint.save_train(mngr, state, _data_state(iterator, pipe), force=True)
      if scorer is not None and done % config.eval.every == 0:
        images = _sample_images(state, exp, config.eval.num_images, config.seed + 2)
        if jax.process_index() == 0:
          writer.write(done, {f"eval_{k}": float(v) for k, v in scorer(images).items()
                              if k not in ("metric", "num_images")})
      if config.sample.num_images and ((config.sample.every and done % config.sample.every == 0)
                                       or done == config.num_steps):
        path = epath.Path(workdir) / "samples" / f"step_{done:07d}.png"
        write_sample_grid(state, exp, path)
        log(f"wrote {path}")
  finally:
    writer.close()
    if bar is not None:
      bar.close()
  return TrainResult(state, COMPLETED, int(state.step))
