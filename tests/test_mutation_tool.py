"""The bookkeeping of tests/mutation.py's parallel runs (`--jobs`) on a hand-made session database
(cosmic-ray's schema; cosmic-ray itself is not needed)."""

import importlib
import pathlib
import sqlite3

import pytest


@pytest.fixture
def mutation(monkeypatch):
  """tests/mutation.py, a script that imports its neighbour planted_bugs.py as a top-level module."""
  monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parent))
  return importlib.import_module("mutation")

SCHEMA = """
CREATE TABLE work_items (job_id VARCHAR NOT NULL, PRIMARY KEY (job_id));
CREATE TABLE mutation_specs (module_path VARCHAR, operator_name VARCHAR, operator_args JSON, occurrence INTEGER,
  start_pos_row INTEGER, start_pos_col INTEGER, end_pos_row INTEGER, end_pos_col INTEGER, definition_name VARCHAR,
  job_id VARCHAR NOT NULL, PRIMARY KEY (job_id));
CREATE TABLE work_results (worker_outcome VARCHAR(9), output TEXT, test_outcome VARCHAR(11), diff TEXT,
  job_id VARCHAR NOT NULL, PRIMARY KEY (job_id));
"""


def _session(path, n_items, done):
  """A session of ``n_items`` mutants (job ids j00, j01, ...; mutant i on line i + 1);
  ``done`` maps job ids to (worker_outcome, test_outcome)."""
  con = sqlite3.connect(path)
  con.executescript(SCHEMA)
  for i in range(n_items):
    con.execute("INSERT INTO work_items VALUES (?)", (f"j{i:02d}",))
    con.execute("INSERT INTO mutation_specs VALUES ('m.py', 'core/NumberReplacer', '{}', 0, ?, 0, ?, 1, 'f', ?)",
                (i + 1, i + 1, f"j{i:02d}"))
  for job, (worker, test) in done.items():
    con.execute("INSERT INTO work_results VALUES (?, '', ?, 'diff', ?)", (worker, test, job))
  con.commit()
  con.close()


def _jobs(path, table):
  con = sqlite3.connect(path)
  out = [r[0] for r in con.execute(f"SELECT job_id FROM {table} ORDER BY job_id")]
  con.close()
  return out


def test_split_gives_each_job_a_disjoint_share_of_the_pending_mutants_and_merge_brings_them_back(
    mutation, tmp_path, monkeypatch):
  monkeypatch.setattr(mutation, "ROOT", tmp_path)
  db = tmp_path / "m.sqlite"
  done = {"j00": ("SKIPPED", None), "j03": ("NORMAL", "KILLED"), "j04": ("NORMAL", "SURVIVED")}
  _session(db, 10, done)
  pending = ["j01", "j02", "j05", "j06", "j07", "j08", "j09"]

  shards = mutation._split_pending(db, "m", 3)
  assert [s.name for s in shards] == ["m.shard0.sqlite", "m.shard1.sqlite", "m.shard2.sqlite"]
  # every 3rd pending mutant from the share's index on; nothing finished, no verdicts copied
  assert [_jobs(s, "work_items") for s in shards] == [["j01", "j06", "j09"], ["j02", "j07"], ["j05", "j08"]]
  assert sorted(sum((_jobs(s, "work_items") for s in shards), [])) == pending
  assert [_jobs(s, "mutation_specs") for s in shards] == [_jobs(s, "work_items") for s in shards]
  assert [_jobs(s, "work_results") for s in shards] == [[], [], []]

  # the jobs give their verdicts: one share finished, one half, one nothing (an interrupted run)
  verdicts = {"j01": "KILLED", "j06": "SURVIVED", "j09": "KILLED", "j07": "KILLED"}
  for s in shards:
    con = sqlite3.connect(s)
    for job in _jobs(s, "work_items"):
      if job in verdicts:
        con.execute("INSERT INTO work_results VALUES ('NORMAL', '', ?, 'diff', ?)", (verdicts[job], job))
    con.commit()
    con.close()
  (tmp_path / "m.shard3.sqlite").touch()    # an empty share (its copy never finished) is dropped
  assert mutation._merge_shards(db, "m") == 4
  assert list(tmp_path.glob("*shard*")) == []
  assert _jobs(db, "work_results") == sorted([*done, *verdicts])
  assert _jobs(db, "work_items") == [f"j{i:02d}" for i in range(10)]   # the session itself is untouched

  (tmp_path / "m.py").write_text("".join(f"x{i} = {i}\n" for i in range(10)))
  r = mutation.results(db, mutation.Target("m.py", (), 1.0), repo=tmp_path)
  assert (r["killed"], r["survived"], r["skipped"], r["pending"], r["errors"]) == (4, 2, 1, 3, 0)
  assert r["score"] == pytest.approx(4 / 6)
  assert [(s["line"], s["source"]) for s in r["survivors"]] == [(5, "x4 = 4"), (7, "x6 = 6")]

  # a second split shares only the three still pending
  shards = mutation._split_pending(db, "m", 2)
  assert [_jobs(s, "work_items") for s in shards] == [["j02", "j08"], ["j05"]]
  assert mutation._merge_shards(db, "m") == 0


def test_jobs_below_one_is_refused(mutation):
  with pytest.raises(SystemExit):
    mutation.main(["--jobs", "0", "--list"])
