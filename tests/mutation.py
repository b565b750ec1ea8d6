"""Mutation testing of the core modules with cosmic-ray (docs/testing.md records the outcome).

    make mutation                                   # every module below (hours on 2 CPU cores)
    python tests/mutation.py asymflow objective     # some of them; --list shows the test sets
    python tests/mutation.py objective --jobs 2     # its mutants shared by two processes

cosmic-ray (a maintained tool, 8.7) rewrites one operator, number or condition at a time in the
source and runs a test command in a subprocess; a mutant is *killed* when that command fails. A
subprocess per mutant is what JAX needs: jit caches a trace per function, so tools that switch
mutants inside one long-lived process (mutmut's fork, pytest-gremlins' switching) can run a
cached trace of the unmutated code and report false survivors.

Everything runs in a copy of the repository under ``workdirs/mutation/repo_<name>`` (the working
tree is never modified, even if a run is interrupted mid-mutant; two modules can run side by side). Each module has a session database
``workdirs/mutation/<name>.sqlite``; a rerun resumes the pending mutants while the module is
unchanged (and starts over otherwise); ``--retest`` also reruns the survivors, against the tests
as they are now. The mutated module's own fast test files form the
test command (``-x``: the first failure kills the mutant). XLA's persistent compilation cache is
on, so the functions a mutant does not touch are not recompiled.

Mutation operators: cosmic-ray's core set, without the binary-operator swaps to bitwise or to
uncommon arithmetic operators (``a * b -> a << b`` fails on every float array at trace time, so it
only costs time) and without mutating ``X | None`` (annotations are never evaluated here, with
``from __future__ import annotations``) and without removing decorators (``jax.jit`` or
``functools.partial(jax.jit, ...)`` removed computes the same values, only slower). Kept: + <-> -, * <-> /, // -> /, % -> //, ** -> *, every
comparison to its boundary (< <-> <=, > <-> >=) and negation (== <-> !=, is <-> is not, in <-> not
in), numbers +- 1, and/or, not, unary minus, True/False, break/continue, loops that never run,
exception types in ``except`` clauses.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys

import planted_bugs

REPO = planted_bugs.REPO
ROOT = REPO / "workdirs" / "mutation"


@dataclasses.dataclass(frozen=True)
class Target:
  path: str
  tests: tuple[str, ...]
  timeout: float     # seconds per mutant; the unmutated tests take a fraction of it


HAND = "tests/test_train_step_hand.py"
TARGETS = {
    "asymflow": Target("asymflow_jax/asymflow.py", (
        "tests/test_asymflow.py", HAND, "tests/test_finetune.py::test_vr_coefficient_against_numpy",
        "tests/test_finetune.py::test_loss_shift_schedule",
        "tests/test_finetune.py::test_vr_gate_is_the_channel_rms_over_each_patch"), 240),
    "objective": Target("asymflow_jax/objective.py", (
        HAND, "tests/test_finetune.py::test_vr_loss_matches_a_float64_derivation",
        "tests/test_finetune.py::test_finetune_step_trains_only_the_subset_and_never_changes_the_teacher",
        "tests/test_train.py::test_sigma_sampler_and_schedule", "tests/test_train.py::test_flow_loss_matches_direct_formula",
        "tests/test_repa.py::test_repa_gradient_reaches_the_blocks_up_to_its_block_and_the_projector_only",
        "tests/test_train.py::test_loss_by_sigma_buckets_at_their_edges",
        "tests/test_asymflux2.py::test_t2i_batch_spec_and_shardings",
        "tests/test_finetune.py::test_map_in_slices_keeps_each_sample_with_its_own_result",
        "tests/test_finetune.py::test_lpips_in_slices_gives_the_same_loss_and_gradient",
        "tests/test_train.py::test_steps_per_call_trains_like_one_step_per_call"), 480),
    "sampling": Target("asymflow_jax/sampling.py", ("tests/test_sampling.py",), 300),
    "subspace": Target("asymflow_jax/subspace/__init__.py", ("tests/test_subspace.py",), 300),
    "checkpoint": Target("asymflow_jax/checkpoint.py", (
        *(f"tests/test_faults.py::{t}" for t in (
            "test_fingerprint_sees_every_single_bit_flip", "test_keep_zero_and_other_bad_values_fail_before_anything_is_touched",
            "test_resume_with_a_changed_model_stops_and_keeps_the_stored_config",
            "test_truncated_latest_checkpoint_falls_back_to_the_previous_step",
            "test_silently_changed_data_fails_its_fingerprint", "test_missing_metadata_everywhere_stops_naming_every_step",
            "test_a_step_with_nan_values_is_refused_on_restore", "test_restore_lets_exit_and_ctrl_c_through",
            "test_quarantine_never_overwrites_an_earlier_copy", "test_rank0_state_saves_and_restores",
            "test_flat_diff_lists_changed_leaves_and_a_subtree_replaced_by_a_value",
            "test_config_json_is_written_into_a_new_nested_workdir")),
        "tests/test_workdir.py", HAND,
        "tests/test_finetune.py::test_finetune_run_resumes_exactly_and_stores_only_the_trained_tree"), 480),
}

_KEEP_BINARY = ("Add_Sub", "Sub_Add", "Mul_Div", "Div_Mul", "FloorDiv_Div", "Mod_FloorDiv", "Pow_Mul")
_KEEP_COMPARE = ("Lt_LtE", "LtE_Lt", "Gt_GtE", "GtE_Gt", "Eq_NotEq", "NotEq_Eq", "Is_IsNot", "IsNot_Is",
                 "In_NotIn", "NotIn_In")
EXCLUDE = (
    "core/ReplaceBinaryOperator_(?!(?:" + "|".join(_KEEP_BINARY) + ")$)",
    "core/ReplaceComparisonOperator_(?!(?:" + "|".join(_KEEP_COMPARE) + ")$)",
    "core/ReplaceUnaryOperator_.*_(?:Invert|UAdd|Not)$",
    "core/RemoveDecorator",
)


def _digest(target: Target) -> str:
  """The mutants of a session are valid while the module and the operator set are unchanged."""
  h = hashlib.sha256((REPO / target.path).read_bytes())
  h.update(json.dumps(EXCLUDE).encode())
  return h.hexdigest()[:16]


def _config(name: str, target: Target, python: str) -> str:
  cmd = f"{python} -m pytest -x -q -p no:cacheprovider {' '.join(target.tests)}"
  excludes = ", ".join(json.dumps(e) for e in EXCLUDE)
  return (f'[cosmic-ray]\nmodule-path = "{target.path}"\ntimeout = {target.timeout}\nexcluded-modules = []\n'
          f'test-command = "{cmd}"\n\n[cosmic-ray.distributor]\nname = "local"\n\n'
          f'[cosmic-ray.filters.operators-filter]\nexclude-operators = [{excludes}]\n')


def _tool(exe: str) -> str:
  path = pathlib.Path(sys.executable).parent / exe
  if not path.exists():
    raise SystemExit(f"{exe} not found next to {sys.executable}: `make mutation` installs cosmic-ray.")
  return str(path)


def results(db: pathlib.Path, target: Target, repo: pathlib.Path = REPO) -> dict:
  """{killed, survived, skipped (filtered out), pending, errors, score, survivors: [{line, operator,
  occurrence, source, diff}]} of one session database."""
  con = sqlite3.connect(db)
  rows = con.execute(
      "SELECT s.operator_name, s.occurrence, s.start_pos_row, r.worker_outcome, r.test_outcome, r.diff "
      "FROM mutation_specs s LEFT JOIN work_results r ON s.job_id = r.job_id").fetchall()
  con.close()
  lines = (repo / target.path).read_text().splitlines()
  out = dict(killed=0, survived=0, skipped=0, pending=0, errors=0, survivors=[])
  for op, occ, row, worker, test, diff in rows:
    worker, test = (worker or "").lower(), (test or "").lower()
    if not worker:
      out["pending"] += 1
    elif worker == "skipped":
      out["skipped"] += 1
    elif worker != "normal":    # cosmic-ray could not apply or run the mutant: no verdict
      out["errors"] += 1
    elif test == "survived":
      out["survived"] += 1
      out["survivors"].append(dict(line=row, operator=op.removeprefix("core/"), occurrence=occ,
                                   source=lines[row - 1].strip(), diff=diff))
    else:    # killed, or incompetent (the mutant does not even import): the tests reject it
      out["killed"] += 1
  done = out["killed"] + out["survived"]
  out["score"] = out["killed"] / done if done else float("nan")
  out["survivors"].sort(key=lambda s: (s["line"], s["operator"]))
  return out


def _forget_survivors(db: pathlib.Path) -> int:
  """Marks the surviving mutants pending again (to rerun them against new tests); returns how many."""
  con = sqlite3.connect(db)
  n = con.execute("DELETE FROM work_results WHERE lower(test_outcome) = 'survived'").rowcount
  con.commit()
  con.close()
  return n


def _shard_paths(name: str) -> list[pathlib.Path]:
  return sorted(ROOT.glob(f"{name}.shard*.sqlite"))


def _merge_shards(db: pathlib.Path, name: str) -> int:
  """Copies the verdicts of the shard databases of an earlier ``--jobs`` run into the session's
  database and deletes the shards; returns how many verdicts were merged."""
  n = 0
  for shard in _shard_paths(name):
    con = sqlite3.connect(db)
    con.execute("ATTACH DATABASE ? AS shard", (str(shard),))
    # (a share whose copy never finished has no results table: nothing to merge)
    if con.execute("SELECT 1 FROM shard.sqlite_master WHERE name = 'work_results'").fetchone():
      n += con.execute("INSERT OR REPLACE INTO work_results SELECT * FROM shard.work_results").rowcount
    con.commit()
    con.close()
    shard.unlink()
  return n


def _split_pending(db: pathlib.Path, name: str, jobs: int) -> list[pathlib.Path]:
  """Writes ``jobs`` copies of the session database, copy i keeping every jobs-th pending mutant
  from i on (the finished ones and the others removed), so that each runs a disjoint share."""
  con = sqlite3.connect(db)
  pending = [r[0] for r in con.execute(
      "SELECT job_id FROM work_items WHERE job_id NOT IN (SELECT job_id FROM work_results) ORDER BY job_id")]
  con.close()
  shards = []
  for i in range(jobs):
    shard = ROOT / f"{name}.shard{i}.sqlite"
    shutil.copy(db, shard)
    keep = pending[i::jobs]
    con = sqlite3.connect(shard)
    con.execute("DELETE FROM work_results")
    for table in ("mutation_specs", "work_items"):
      con.execute(f"DELETE FROM {table} WHERE job_id NOT IN ({','.join('?' * len(keep))})", keep)
    con.commit()
    con.close()
    shards.append(shard)
  return shards


def run(name: str, target: Target, python: str, retest: bool = False, jobs: int = 1) -> dict:
  db = ROOT / f"{name}.sqlite"
  stamp = ROOT / f"{name}.digest"
  digest = _digest(target)
  # one copy of the repository per module and job, so that sessions and their shares run side by side
  repos = [ROOT / (f"repo_{name}" if i == 0 else f"repo_{name}_{i}") for i in range(jobs)]
  for repo in repos:
    if repo.exists():
      shutil.rmtree(repo)
    repo.mkdir(parents=True)
    planted_bugs.copy_repo(repo)
    (repo / f"mutation_{name}.toml").write_text(_config(name, target, python))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(repos[0]),
             JAX_COMPILATION_CACHE_DIR=str(ROOT / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cfg = repos[0] / f"mutation_{name}.toml"
  call = lambda *a: subprocess.run(a, cwd=repos[0], env=env, check=True)
  if not (db.exists() and stamp.exists() and stamp.read_text() == digest):
    db.unlink(missing_ok=True)
    for shard in _shard_paths(name):
      shard.unlink()
    # the unmutated tests must pass first, or every mutant would look killed
    proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *target.tests],
                          cwd=repos[0], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
      raise SystemExit(f"{name}: the tests fail on the unmutated copy:\n{proc.stdout[-3000:]}")
    call(_tool("cosmic-ray"), "init", str(cfg), str(db))
    call(_tool("cr-filter-operators"), str(db), str(cfg))
    stamp.write_text(digest)
  else:
    merged = _merge_shards(db, name)    # an interrupted --jobs run keeps what its shares finished
    if merged:
      print(f"{name}: {merged} verdicts of an interrupted parallel run merged", flush=True)
    if retest:
      print(f"{name}: {_forget_survivors(db)} survivors to test again", flush=True)
  if jobs == 1:
    call(_tool("cosmic-ray"), "exec", str(cfg), str(db))
  else:
    procs = [subprocess.Popen([_tool("cosmic-ray"), "exec", str(repo / f"mutation_{name}.toml"), str(shard)],
                              cwd=repo, env=dict(env, PYTHONPATH=str(repo)))
             for repo, shard in zip(repos, _split_pending(db, name, jobs))]
    codes = [p.wait() for p in procs]
    _merge_shards(db, name)
    if any(codes):
      raise SystemExit(f"{name}: cosmic-ray exec exited {codes}; the finished verdicts are kept")
  return results(db, target, repos[0])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("names", nargs="*", help=f"modules (default: all of {list(TARGETS)})")
  p.add_argument("--list", action="store_true", help="list the modules and their test commands, then exit")
  p.add_argument("--report", action="store_true", help="only print the results of the existing sessions")
  p.add_argument("--retest", action="store_true",
                 help="run the survivors of an existing session again (after adding tests), then any pending ones")
  p.add_argument("--jobs", type=int, default=1,
                 help="run a session's pending mutants in this many processes side by side (one repository copy each)")
  p.add_argument("--python", default=sys.executable)
  args = p.parse_args(argv)
  unknown = [n for n in args.names if n not in TARGETS]
  if unknown:
    p.error(f"unknown module(s) {unknown}; choose from {list(TARGETS)}")
  if args.jobs < 1:
    p.error(f"--jobs must be at least 1, got {args.jobs}")
  names = args.names or list(TARGETS)
  if args.list:
    for n in names:
      t = TARGETS[n]
      print(f"{n:11s} {t.path}  <- {' '.join(t.tests)}  (timeout {t.timeout:.0f} s per mutant)")
    return 0
  ROOT.mkdir(parents=True, exist_ok=True)
  summary = {}
  for n in names:
    t = TARGETS[n]
    db = ROOT / f"{n}.sqlite"
    if args.report and not db.exists():
      print(f"{n}: no session ({db})")
      continue
    r = results(db, t) if args.report else run(n, t, args.python, retest=args.retest, jobs=args.jobs)
    summary[n] = {k: v for k, v in r.items() if k != "survivors"}
    print(f"## {n} ({t.path}): {r['killed']} killed, {r['survived']} survived, score {r['score']:.1%}"
          + (f", {r['pending']} pending" if r["pending"] else "") + (f", {r['errors']} errors" if r["errors"] else "")
          + f"  ({r['skipped']} filtered out)")
    for s in r["survivors"]:
      print(f"  line {s['line']:4d}  {s['operator']:40s} #{s['occurrence']:<3d} {s['source']}")
    (ROOT / f"{n}_survivors.json").write_text(json.dumps(r["survivors"], indent=1))
  (ROOT / "summary.json").write_text(json.dumps(summary, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
