"""The evaluate CLI and in-training evaluation on the embedded digits (FDD)."""

import json

import numpy as np
import pytest

from asymflow_jax import config as config_lib, evaluate, scoring, trainer
from asymflow_jax.evaluation import classifier
from tests.train_config import tiny_train_config


def test_in_training_evaluation_logs_fdd(tmp_path, digit_classifier):
  config = tiny_train_config(2)
  config.eval.every, config.eval.metric, config.eval.num_images = 2, "fdd", 16
  config.sample.num_steps = 2
  workdir = tmp_path / "wd"
  workdir.mkdir()
  (workdir / "digit_classifier.msgpack").write_bytes(digit_classifier.read_bytes())
  trainer.train(config, str(workdir), progress=False)
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval_fdd" in r]
  assert [r["step"] for r in evals] == [2]
  assert evals[0]["eval_fdd"] > 0 and 1.0 <= evals[0]["eval_digit_is"] <= 10.0


def test_fid_evaluation_without_weights_fails_before_training():
  config = tiny_train_config(2)
  config.eval.every, config.eval.metric = 2, "fid"
  with pytest.raises(ValueError, match=r"config.eval.inception / config.eval.reference are empty"):
    config_lib.validate_config(config, num_devices=1)
  with pytest.raises(ValueError, match=r"--metric=fid needs --inception"):
    scoring.score_images(np.zeros((2, 32, 32, 1), np.uint8), "fid")


def test_evaluate_cli_on_an_images_file(tmp_path, capsys, digit_classifier):
  digits, _ = classifier.embedded_digits()
  pick = np.random.default_rng(0).permutation(len(digits))[:200]   # the csv is sorted by class
  real = np.round((digits[pick] + 1) * 127.5).astype(np.uint8)
  noise = np.random.default_rng(0).integers(0, 256, real.shape).astype(np.uint8)
  scores = {}
  for name, images in (("real", real), ("noise", noise)):
    np.savez(tmp_path / f"{name}.npz", images=images)
    out = tmp_path / f"{name}.json"
    assert evaluate.main(["--images", str(tmp_path / f"{name}.npz"), "--metric", "fdd", "--classifier",
                          str(digit_classifier), "--out", str(out)]) == 0
    scores[name] = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == scores[name]
  assert scores["real"]["num_images"] == 200
  # real digits are closer to the digit statistics than noise (200 images and a briefly trained
  # classifier: both distances carry a large small-sample bias), and spread over the 10 classes
  # (digit IS near 10) where noise collapses onto a few classes
  assert scores["real"]["fdd"] < 0.1 * scores["noise"]["fdd"]
  assert scores["real"]["digit_is"] > 2 * scores["noise"]["digit_is"]
