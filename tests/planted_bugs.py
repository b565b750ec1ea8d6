"""Plants plausible bugs, one at a time, in a throwaway copy of the repository and runs the tests that
should catch each: a bug is "caught" when those tests fail. docs/testing.md records the outcome.

    make planted                          # every bug (~5 min on 2 CPU cores)
    python tests/planted_bugs.py [NAME ...] [--list]

Each bug is an exact source replacement (the script stops if the original text is not found, so it
cannot silently plant nothing). The copy holds the tracked files plus the untracked, non-ignored
ones (``git ls-files -co --exclude-standard``); the working tree is never modified.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Bug:
  name: str
  what: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]


HAND = "tests/test_train_step_hand.py"
BUGS = (
    Bug("loss_weight_one", "loss weight w = sigma / max(sigma, 0.05) replaced by 1", "asymflow_jax/objective.py",
        "w = (sigma / jnp.maximum(sigma, config.loss_sigma_min))[:, None, None, None]",
        "w = jnp.ones_like(sigma)[:, None, None, None]", (HAND,)),
    Bug("no_label_dropout", "label dropout removed (labels always kept)", "asymflow_jax/models/backbone.py",
        "return jnp.where(keep, labels, model.config.num_classes)", "return labels", (HAND,)),
    Bug("ema_reversed", "EMA update the wrong way round: e + (p - e) d instead of p + (e - p) d",
        "asymflow_jax/objective.py", "lambda e, p, d=d: p + (e - p) * d", "lambda e, p, d=d: e + (p - e) * d",
        (HAND,)),
    Bug("adamw_betas_swapped", "AdamW b1 and b2 swapped", "asymflow_jax/experiment.py",
        "optax.adamw(lr_schedule(config), b1=config.b1, b2=config.b2,",
        "optax.adamw(lr_schedule(config), b1=config.b2, b2=config.b1,", (HAND,)),
    Bug("no_nonfinite_skip", "the skip-on-non-finite update removed (updates always applied)",
        "asymflow_jax/objective.py", "  finite = kind == 0\n", "  finite = jnp.asarray(True)\n", (HAND,)),
    Bug("save_guard_disabled", 'the "never save a non-finite state" guard disabled', "asymflow_jax/checkpoint.py",
        "  if int(state.nonfinite_step) >= 0:\n    raise FloatingPointError(",
        "  if False:\n    raise FloatingPointError(", (HAND,)),
    Bug("inception_concat_order", "FID Inception: two branch outputs of InceptionA concatenated in the wrong order",
        "asymflow_jax/evaluation/inception.py", "jnp.concatenate([b1, b5, b3, bp], axis=-1)",
        "jnp.concatenate([b5, b1, b3, bp], axis=-1)", ("tests/test_inception_real.py",)),
    Bug("inception_bn_eps", "FID Inception: BatchNorm eps 1e-3 -> 1e-5", "asymflow_jax/evaluation/inception.py",
        "BN_EPSILON = 1e-3", "BN_EPSILON = 1e-5", ("tests/test_inception_real.py",)),
)

# Mutants of objective.py that survived the first mutation run (docs/testing.md) and the tests written
# to kill them: planted here so that each kill can be replayed without rerunning the whole session.
BUCKETS = "tests/test_train.py::test_loss_by_sigma_buckets_at_their_edges"
VR = "tests/test_finetune.py::test_vr_loss_matches_a_float64_derivation"
T2I = "tests/test_asymflux2.py::test_t2i_batch_spec_and_shardings"
BUGS += (
    Bug("mut_bucket_edge", "a loss_by_sigma bucket edge moved (0.75 -> 1.75)", "asymflow_jax/objective.py",
        "SIGMA_BUCKETS = (0.0, 0.25, 0.5, 0.75, 1.0)", "SIGMA_BUCKETS = (0.0, 0.25, 0.5, 1.75, 1.0)", (BUCKETS,)),
    Bug("mut_bucket_clip", "sigma = 1 indexes past the last loss_by_sigma bucket (upper clip - 2 -> - 1)",
        "asymflow_jax/objective.py", "0, len(SIGMA_BUCKETS) - 2)", "0, len(SIGMA_BUCKETS) - 1)", (BUCKETS,)),
    Bug("mut_lora_dropout_key", "LoRA dropout key fold_in(k_drop, 1) -> fold_in(k_drop, 2)", "asymflow_jax/objective.py",
        "rngs[finetune.LORA_DROPOUT] = jax.random.fold_in(k_drop, 1)",
        "rngs[finetune.LORA_DROPOUT] = jax.random.fold_in(k_drop, 2)", (VR + "[dropout]",)),
    Bug("mut_vr_student_eval", "the VR student run with train=False (no dropout)", "asymflow_jax/objective.py",
        "train=True, rngs=rngs, lora=lora)", "train=False, rngs=rngs, lora=lora)", (VR + "[dropout]",)),
    Bug("mut_lpips_scale", "LPIPS on n of b samples scaled by / (b / n) instead of * (b / n)", "asymflow_jax/objective.py",
        "per_lpips * (b / n))", "per_lpips / (b / n))", (VR + "[lpips]",)),
    Bug("mut_t2i_grid", "text-to-image batch spec: token grid input_size / patch_size (a float)",
        "asymflow_jax/objective.py", "g = m.input_size // m.patch_size", "g = m.input_size / m.patch_size", (T2I,)),
    Bug("mut_batch_sharding_rank", "extra batch arrays sharded with rank 0 + len(shape)", "asymflow_jax/objective.py",
        "shd.batch_sharding(mesh, 1 + len(shape))", "shd.batch_sharding(mesh, 0 + len(shape))", (T2I,)),
)

# Mutants of checkpoint.py that survived its first mutation run and the tests written to kill them.
FAULTS = "tests/test_faults.py::"
CK = "asymflow_jax/checkpoint.py"
BUGS += (
    Bug("mut_restore_nan_check", "restore's finiteness check always passes (`or [True]` -> `and [True]`)", CK,
        "if jnp.issubdtype(x.dtype, jnp.floating)] or [True]))", "if jnp.issubdtype(x.dtype, jnp.floating)] and [True]))",
        (FAULTS + "test_a_step_with_nan_values_is_refused_on_restore",)),
    Bug("mut_restore_swallows_exit", "SystemExit/Ctrl-C during a restore become a CheckpointError (and a fallback)", CK,
        "  except (KeyboardInterrupt, SystemExit):\n    raise\n  except Exception as e:  # orbax",
        "  except BaseException as e:  # orbax",
        (FAULTS + "test_restore_lets_exit_and_ctrl_c_through",)),
    Bug("mut_quarantine_suffix", "a second quarantine of a step counts its suffix down (n + 1 -> n - 1)", CK,
        'target, n = dest / f"{step}.{n}", n + 1', 'target, n = dest / f"{step}.{n}", n - 1',
        (FAULTS + "test_quarantine_never_overwrites_an_earlier_copy",)),
    Bug("mut_rank0_basis", "the rank-0 basis is stored (shape[-1] == 0 -> == -1)", CK,
        "if basis.shape[-1] == 0 else", "if basis.shape[-1] == -1 else", (FAULTS + "test_rank0_state_saves_and_restores",)),
    Bug("mut_flat_diff", "the resume diff recurses when only one side is a dict (and -> or)", CK,
        "if isinstance(va, dict) and isinstance(vb, dict):", "if isinstance(va, dict) or isinstance(vb, dict):",
        (FAULTS + "test_flat_diff_lists_changed_leaves_and_a_subtree_replaced_by_a_value",)),
    Bug("mut_quarantine_first_suffix", "the first quarantine copy of a step is .2, not .1 (n = 1 -> 2)", CK,
        "      n = 1\n", "      n = 2\n", (FAULTS + "test_quarantine_never_overwrites_an_earlier_copy",)),
    Bug("mut_config_parents", "config.json's parent folders are not created (parents=True -> False)", CK,
        "path.parent.mkdir(parents=True, exist_ok=True)", "path.parent.mkdir(parents=False, exist_ok=True)",
        (FAULTS + "test_config_json_is_written_into_a_new_nested_workdir",)),
    Bug("mut_save_interval", "the manager skips odd steps (save_interval_steps 1 -> 2)", CK,
        "save_interval_steps=1,", "save_interval_steps=2,", (FAULTS + "test_rank0_state_saves_and_restores",)),
    Bug("mut_fingerprint_sizes", "no bit view for 1-byte leaves in the fingerprint ({1: ...} -> {2: ...})", CK,
        "bits = {1: jnp.uint8,", "bits = {2: jnp.uint8,", (FAULTS + "test_fingerprint_sees_every_single_bit_flip",)),
    Bug("mut_bad_leaves_listed", "the corrupt-data message lists 6 leaves instead of 5", CK,
        "', '.join(bad[:5])", "', '.join(bad[:6])", (FAULTS + "test_silently_changed_data_fails_its_fingerprint",)),
)

# Mutants of sampling.py that survived its first mutation run and its retest, killed by assertions added after.
SAMPLING = "tests/test_sampling.py::"
BUGS += (
    Bug("mut_final_step", "Heun's final Euler step evaluated at s_{N-2} (num_steps - 1 -> - 2)", "asymflow_jax/sampling.py",
        "  return euler_step(num_steps - 1, x)", "  return euler_step(num_steps - 2, x)",
        (SAMPLING + "test_sigma_grid_and_evaluation_count",)),
    Bug("mut_num_min", "generate_from_config refuses a single image (num < 1 -> num < 2)", "asymflow_jax/sampling.py",
        "  if num < 1:", "  if num < 2:", (SAMPLING + "test_generate_on_mesh_and_from_config_compose_the_sampler_pieces",)),
)


# Mutants of subspace/__init__.py that survived its first mutation run, killed by tests added for them.
SUBSPACE = "tests/test_subspace.py::"
SUB = "asymflow_jax/subspace/__init__.py"
BUGS += (
    Bug("mut_sign_fold", "random_subspace folds R's signs into Q only where diag(R) < -1 (< 0 -> < -1)", SUB,
        "np.where(np.diag(r) < 0, -1.0, 1.0)", "np.where(np.diag(r) < -1, -1.0, 1.0)",
        (SUBSPACE + "test_random_subspace_folds_the_signs_of_r_into_q",)),
    Bug("mut_full_rank", "a full-rank subspace (r = D) is refused (rank <= dim -> rank < dim)", SUB,
        "not 0 <= rank <= dim:", "not 0 <= rank < dim:", (SUBSPACE + "test_random_subspace_folds_the_signs_of_r_into_q",)),
    Bug("mut_nchw_one_channel", "single-channel NCHW images are not transposed to NHWC ((1, 3, 4) -> (2, 3, 4))", SUB,
        "if arr.shape[1] in (1, 3, 4) and", "if arr.shape[1] in (2, 3, 4) and",
        (SUBSPACE + "test_load_image_array_layouts_keys_and_ranges",)),
    Bug("mut_procrustes_count", "the Procrustes token count starts at -1 (count = 0 -> -1)", SUB,
        "  count: int = 0\n", "  count: int = -1\n", (SUBSPACE + "test_procrustes_stats_sums_counts_and_shape_errors",)),
)

# sampling.py's open gap of its mutation run (line 139), killed 2026-12-07.
BUGS += (
    Bug("mut_velocity_train", "the inference velocity runs the model in train mode", "asymflow_jax/sampling.py",
        "scale=scale, sigma_min=sigma_min, train=False)", "scale=scale, sigma_min=sigma_min, train=True)",
        ("tests/test_sampling.py::test_velocity_fn_runs_a_model_with_dropout_in_eval_mode",)),
)

# The performance issue's features (2026-12-07): K steps per call, the splash kernel, LPIPS in slices.
BUGS += (
    Bug("k_steps_reversed", "K steps per call run their batches last to first", "asymflow_jax/objective.py",
        "return jax.lax.scan(step, state, batches)", "return jax.lax.scan(step, state, batches, reverse=True)",
        (HAND + "::test_k_steps_in_one_call_are_k_single_steps",)),
    Bug("call_skips_an_event", "a K-step call may pass over an event at its second step", "asymflow_jax/trainer.py",
        "inside = range(step + 1, step + k)", "inside = range(step + 2, step + k)",
        ("tests/test_train.py::test_call_lengths_stop_at_every_log_checkpoint_and_the_end",)),
    Bug("splash_attends_a_pad_key", "the splash kernel attends the first padded key (>= s -> > s)",
        "asymflow_jax/models/attention.py", "segment = jnp.asarray((np.arange(padded) >= s)",
        "segment = jnp.asarray((np.arange(padded) > s)",
        ("tests/test_model.py::test_splash_attention_matches_softmax_attention_and_its_gradient",)),
    Bug("lpips_slices_shuffled", "LPIPS slices put back in the wrong sample order", "asymflow_jax/objective.py",
        "return jnp.swapaxes(out, 0, 1).reshape(n, *out.shape[2:])", "return out.reshape(n, *out.shape[2:])",
        ("tests/test_finetune.py::test_map_in_slices_keeps_each_sample_with_its_own_result",)),
    # objective.py mutation rerun (2026-12-07): two slices computed at once (same values, all the memory)
    Bug("mut_two_slices_at_once", "vr.lpips_chunks = 2 runs LPIPS on all samples at once", "asymflow_jax/objective.py",
        "  if slices == 1:\n", "  if slices == 2:\n",
        ("tests/test_finetune.py::test_map_in_slices_keeps_each_sample_with_its_own_result",)),
    # checkpoint.py mutation run, resumed (2026-12-07): missing weights
    Bug("mut_weights_fallback", "any missing EMA tree silently falls back to params", "asymflow_jax/checkpoint.py",
        'if weights == "ema_0" and "params" in present:', 'if weights == "ema_0" or "params" in present:',
        ("tests/test_workdir.py::test_train_finetunes_a_converted_workdir",)),
    Bug("mut_weights_listed", "the missing-weights message lists every item of the step", "asymflow_jax/checkpoint.py",
        'if n == "params" or n.startswith("ema_")', 'if n != "params" or n.startswith("ema_")',
        ("tests/test_workdir.py::test_train_finetunes_a_converted_workdir",)),
    Bug("mut_finetune_base_item", "a finetuning workdir opens its base's experiment instead of its state",
        "asymflow_jax/checkpoint.py", "mesh=mesh)[2]", "mesh=mesh)[1]",
        ("tests/test_finetune.py::test_finetune_run_resumes_exactly_and_stores_only_the_trained_tree",)),
)


def copy_repo(dest: pathlib.Path):
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.splitlines()
  for f in files:
    src = REPO / f
    if src.is_file():
      (dest / f).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dest / f)


def run(bug: Bug, python: str, *, plant: bool = True) -> tuple[bool, float, str]:
  """(caught, seconds, last lines of pytest's output) for one planted bug (``plant=False``: the same
  tests on the unmodified copy, the control, which must pass)."""
  with tempfile.TemporaryDirectory(prefix=f"planted-{bug.name}-") as tmp:
    root = pathlib.Path(tmp)
    copy_repo(root)
    target = root / bug.path
    src = target.read_text()
    if src.count(bug.old) != 1:
      raise SystemExit(f"{bug.name}: the text to replace occurs {src.count(bug.old)} times in {bug.path} "
                       f"(expected once): {bug.old!r}")
    if plant:
      target.write_text(src.replace(bug.old, bug.new))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    t0 = time.time()
    proc = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *bug.tests], cwd=root,
                          env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    failed = [ln.split(" - ")[0] for ln in lines if ln.startswith("FAILED ")]
    tail = "\n".join(failed + lines[-1:])
    if proc.returncode not in (0, 1):   # 1 = tests failed; anything else (no tests, usage error) is no verdict
      raise SystemExit(f"{bug.name}: pytest exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.returncode == 1, time.time() - t0, tail


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("names", nargs="*", help="bugs to plant (default: all)")
  p.add_argument("--list", action="store_true", help="list the bugs and exit")
  p.add_argument("--python", default=sys.executable)
  args = p.parse_args(argv)
  known = {b.name: b for b in BUGS}
  unknown = [n for n in args.names if n not in known]
  if unknown:
    p.error(f"unknown bug(s) {unknown}; choose from {sorted(known)}")
  bugs = [known[n] for n in args.names] if args.names else list(BUGS)
  if args.list:
    for b in bugs:
      print(f"{b.name:24s} {b.what}  [{b.path}] -> {' '.join(b.tests)}")
    return 0
  # control: every test set passes on the unmodified copy, so a failure below is the planted bug's doing
  for tests in dict.fromkeys(b.tests for b in bugs):
    b = next(b for b in bugs if b.tests == tests)
    failed, seconds, tail = run(b, args.python, plant=False)
    print(f"{'FAILED ' if failed else 'passes '} control {' '.join(tests)}  {seconds:5.0f} s\n    {tail.splitlines()[-1]}",
          flush=True)
    if failed:
      raise SystemExit(f"the tests {tests} fail without any planted bug: fix them first")
  survived = []
  for b in bugs:
    caught, seconds, tail = run(b, args.python)
    print(f"{'CAUGHT ' if caught else 'SURVIVED'} {b.name:24s} {seconds:5.0f} s  {b.what}\n    "
          + "\n    ".join(tail.splitlines()), flush=True)
    if not caught:
      survived.append(b.name)
  print(f"{len(bugs) - len(survived)} of {len(bugs)} planted bugs caught" + (f"; survived: {survived}" if survived else ""))
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
