"""Training system: loss definition, 1 vs 8 devices, exact resume, fail-fast configs (a cross-topology
restore: tests/test_multiprocess.py)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax import asymflow as af
from asymflow_jax import config as config_lib
from asymflow_jax import experiment
from asymflow_jax import objective
from asymflow_jax import trainer
from asymflow_jax.data import pipeline as data_pipeline
from asymflow_jax.models import asymjit
from tests import fault_worker
from tests.conftest import as_killed, flat_params, subprocess_env
from tests.train_config import tiny_train_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_worker(workdir, steps, out, devices, mesh="1,-1,1"):
  env = subprocess_env(devices)
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "train_worker.py"), str(workdir), str(steps), str(out),
                         mesh], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(out))


def _run_on_8_devices(script: str, tmp_path) -> dict:
  """Runs ``script`` (python -c, argv[1] = tmp_path) with 8 fake CPU devices: the JSON of its last
  stdout line, plus its stderr."""
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=subprocess_env(8), capture_output=True,
                        text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(json.loads(proc.stdout.strip().splitlines()[-1]), stderr=proc.stderr)


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _resume_after_a_kill(straight_workdir, workdir, config):
  """The run of ``straight_workdir`` as a kill during step 4 leaves it (checkpoint 2 committed,
  metrics of steps 1-3 logged, nothing of step 4), then resumed to ``config.num_steps``."""
  as_killed(straight_workdir, workdir, checkpoint=2, logged=3)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  return trainer.train(config, str(workdir), progress=False).state


def test_loss_by_sigma_buckets_at_their_edges():
  """The logged loss_by_sigma: buckets [0, .25), [.25, .5), [.5, .75), [.75, 1], edges included on
  the left and sigma = 1 in the last bucket; an empty bucket logs 0 with count 0."""
  sigma = jnp.asarray([0.0, 0.1, 0.25, 0.3, 0.5, 0.7499, 0.75, 0.9, 1.0])
  values = jnp.arange(1.0, 10.0)
  means, counts = objective._bucket_means(values, sigma)
  np.testing.assert_array_equal(counts, [2, 2, 2, 3])
  np.testing.assert_allclose(means, [(1 + 2) / 2, (3 + 4) / 2, (5 + 6) / 2, (7 + 8 + 9) / 3], rtol=1e-6)
  means, counts = objective._bucket_means(jnp.asarray([4.0, 6.0]), jnp.asarray([0.2, 0.8]))
  np.testing.assert_array_equal(counts, [1, 0, 0, 1])
  np.testing.assert_allclose(means, [4.0, 0.0, 0.0, 6.0])


def test_sigma_sampler_and_schedule():
  c = tiny_train_config()
  sigma = np.asarray(objective.sample_sigma(jax.random.key(0), 20000, c))
  assert sigma.min() >= 1e-4 and sigma.max() <= 1
  # logit-normal: logit(sigma) ~ N(0.8, 0.8^2)
  logit = np.log(sigma / (1 - sigma))
  assert abs(logit.mean() - 0.8) < 0.03 and abs(logit.std() - 0.8) < 0.03
  c.sigma_shift = 3.0
  shifted = np.asarray(objective.sample_sigma(jax.random.key(0), 20000, c))
  np.testing.assert_allclose(shifted, np.clip(3 * sigma / (1 + 2 * sigma), 1e-4, 1), rtol=1e-5)
  c.lr, c.warmup_steps, c.warmup_ratio = 1e-3, 10, 1e-8
  sched = experiment.lr_schedule(c)
  np.testing.assert_allclose([float(sched(i)) for i in (0, 5, 10, 50)], [1e-3 * 1e-8, 1e-3 * (1 - 0.5 * (1 - 1e-8)), 1e-3, 1e-3],
                             rtol=1e-6)


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_flow_loss_matches_direct_formula(dropout):
  c = tiny_train_config()
  c.prob_class = 1.0
  if dropout:   # 4 blocks, so that blocks 1 and 2 have dropout: the loss runs the network in train mode
    c.model.depth, c.model.proj_dropout = 4, dropout
  model = experiment.model_from_config(c)
  basis = jnp.asarray(np.linalg.qr(np.random.default_rng(0).standard_normal((16, 4)))[0], jnp.float32)
  # (jitted: run eagerly, the network's init and forward compile hundreds of small programs)
  params = jax.jit(lambda k: asymjit.init_params(model, k, basis))(jax.random.key(1))
  rng = np.random.default_rng(1)
  # away from the initialisation, whose zero output layer would hide what the blocks (and dropout) do
  params = jax.tree.map(lambda a: a + jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), params)
  batch = dict(image=jnp.asarray(rng.uniform(-1, 1, (4, 32, 32, 1)), jnp.float32), label=jnp.arange(4))
  key = jax.random.key(3)
  loss, aux = jax.jit(lambda p, b, k: objective.flow_loss(p, b, k, basis, 1.0, model=model, config=c))(params, batch, key)
  # rebuild the same draws and the loss by hand: w = sigma / max(sigma, 0.05), target eps - x0
  _, k_sigma, k_noise, k_drop = jax.random.split(key, 4)
  sigma = objective.sample_sigma(k_sigma, 4, c)
  noise = jax.random.normal(k_noise, (4, 32, 32, 1))
  x0 = batch["image"]
  x_t = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
  u = jax.jit(lambda p, x, s: asymjit.asymjit_apply(model, p, x, s, batch["label"], basis, sigma_min=af.TRAIN_SIGMA_MIN,
                                                    train=True, rngs={"dropout": k_drop}))(params, x_t, sigma)
  if dropout:   # and dropout matters: the eval-mode network gives another loss
    u_eval = jax.jit(lambda p, x, s: asymjit.asymjit_apply(model, p, x, s, batch["label"], basis,
                                                         sigma_min=af.TRAIN_SIGMA_MIN))(params, x_t, sigma)
    assert np.abs(np.asarray(u_eval) - np.asarray(u)).max() > 1e-3
  w = np.asarray(sigma / np.maximum(sigma, 0.05))[:, None, None, None]
  want = np.mean((w * (np.asarray(u) - (np.asarray(noise) - np.asarray(x0)))) ** 2)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(aux["sigma"]), np.asarray(sigma))


def test_bad_configs_fail_fast_with_clear_messages():
  c = tiny_train_config()
  c.batch_size = 6
  with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by data x fsdp = 4"):
    config_lib.validate_config(c, num_devices=4)
  c = tiny_train_config()
  c.mesh.data, c.mesh.fsdp = 2, 2
  with pytest.raises(ValueError, match=r"has 4 devices but 8 are available"):
    config_lib.validate_config(c, num_devices=8)
  c = tiny_train_config()
  c.model.rank = 17
  with pytest.raises(ValueError, match=r"rank=17 is outside \[0, D=16\]"):
    config_lib.validate_config(c, num_devices=1)
  c = tiny_train_config()
  c.model.rank = 16
  c.model.bottleneck_dim = 8
  with pytest.raises(ValueError, match=r"rank=16 exceeds bottleneck_dim=8: the projected init"):
    config_lib.validate_config(c, num_devices=1)
  c.model.projected_init = False
  config_lib.validate_config(c, num_devices=1)  # r = D velocity prediction without the projected init is valid
  c = tiny_train_config()
  c.model.patch_size = 5
  with pytest.raises(ValueError, match=r"input_size=32 is not divisible by patch_size=5"):
    config_lib.validate_config(c, num_devices=1)
  c = tiny_train_config()
  c.data.image_size = 28
  with pytest.raises(ValueError, match=r"does not match the data 28x28x1"):
    config_lib.validate_config(c, num_devices=1)
  c = tiny_train_config()
  c.model.attention_impl = "flash"
  with pytest.raises(ValueError, match=r"attention_impl='flash': expected one of \('einsum', 'dot_product_attention', "
                                       r"'splash'\)"):
    config_lib.validate_config(c, num_devices=1)
  c.model.attention_impl, c.model.attn_dropout = "dot_product_attention", 0.1
  with pytest.raises(ValueError, match=r"attn_dropout=0.1: dropout on the attention probabilities needs "
                                       r"config.model.attention_impl='einsum'"):
    config_lib.validate_config(c, num_devices=1)
  c.model.attn_dropout = 0.0
  config_lib.validate_config(c, num_devices=1)   # the fused path without attention dropout is valid
  c = tiny_train_config()
  c.steps_per_call = 0
  with pytest.raises(ValueError, match=r"config.steps_per_call=0: expected an integer >= 1"):
    config_lib.validate_config(c, num_devices=1)


def test_resume_is_exact(tiny_run, tmp_path):
  straight = tiny_run
  resumed = _resume_after_a_kill(straight["workdir"], tmp_path / "b", tiny_train_config(4, repa=True))
  assert int(resumed.step) == 4
  flat = flat_params(resumed.params)
  assert flat.keys() == straight["params"].keys()
  for k, v in straight["params"].items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)
  flat = flat_params(resumed.ema[0])
  assert flat.keys() == straight["ema"].keys()
  for k, v in straight["ema"].items():
    np.testing.assert_array_equal(flat[k], v, err_msg=k)
  # the same batches were seen after the restart: identical losses at steps 3 and 4, and the step-3
  # row of the killed run was replaced, not repeated
  la, lb = _losses(straight["workdir"]), _losses(tmp_path / "b")
  assert la[3] == lb[3] and la[4] == lb[4]
  assert [json.loads(r)["step"] for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
  # the subspace, optimizer state and step live in the checkpoint
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["2", "4"]
  # TensorBoard scalars next to metrics.jsonl, incl. the loss by sigma bucket
  events = list((straight["workdir"] / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  with open(straight["workdir"] / "metrics.jsonl") as f:
    first = json.loads(f.readline())
  assert {"loss", "grad_norm", "lr", "img_per_s"} <= set(first) and any(k.startswith("loss_sigma_") for k in first)
  # the run trains REPA (tests/train_config.py): its projector is a trained parameter (restored and
  # compared above), its two loss terms are logged and add up to the loss
  assert any(k.startswith("['repa_projector']") for k in straight["params"])
  assert first["loss"] == pytest.approx(first["loss_flow"] + first["loss_repa"], rel=1e-6)
  assert -0.5 <= first["loss_repa"] <= 0.5 and first["loss_repa"] != 0


def test_call_lengths_stop_at_every_log_checkpoint_and_the_end():
  c = tiny_train_config(12)
  c.steps_per_call, c.log_every, c.checkpoint.every = 3, 5, 10
  lengths, step = [], 0
  while step < c.num_steps:
    lengths.append(trainer._call_length(step, c, [5, 10]))   # pylint: disable=protected-access
    step += lengths[-1]
  # calls end at 3; 4, 5 (the log) one step at a time; 8; 9, 10 (log and checkpoint); 11, 12 (no
  # room for 3 steps before the end)
  assert lengths == [3, 1, 1, 3, 1, 1, 1, 1]
  assert [trainer._call_length(s, c, [100]) for s in (0, 8, 9, 10)] == [3, 3, 3, 1]   # pylint: disable=protected-access
  c.steps_per_call = 1
  assert trainer._call_length(0, c, [100]) == 1   # pylint: disable=protected-access


_STEPS_PER_CALL_TRAIN = """
import json, os, sys, numpy as np, jax
from asymflow_jax import objective, trainer
from tests import train_config
calls, jit_train_step = [], objective.jit_train_step
def counted(exp, steps_per_call=1):   # records the steps of every device call the loop makes
  fn = jit_train_step(exp, steps_per_call)
  return lambda state, batch: (calls.append(steps_per_call), fn(state, batch))[1]
objective.jit_train_step = counted
out = {}
for k in (1, 3):
  calls.clear()
  c = train_config.tiny_train_config(7)
  c.steps_per_call, c.log_every, c.checkpoint.every, c.sample.num_images = k, 3, 6, 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
  workdir = os.path.join(sys.argv[1], str(k))
  state = trainer.train(c, workdir, progress=False).state
  losses = {json.loads(line)["step"]: json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))}
  out[k] = (losses, [np.asarray(a) for a in jax.tree.leaves(state.params)], int(state.step),
            sorted(os.listdir(os.path.join(workdir, "checkpoints"))), list(calls))
(l1, p1, s1, c1, k1), (l3, p3, s3, c3, k3) = out[1], out[3]
print(json.dumps(dict(devices=jax.device_count(), losses=[l1, l3], steps=[s1, s3], checkpoints=[c1, c3], n=len(p1),
                      calls=[k1, k3],
                      rel=train_config.max_rel_diff(p1, p3))))
"""


def test_steps_per_call_trains_like_one_step_per_call(tmp_path):
  """7 steps on a 2 x 4 mesh with ``steps_per_call=3`` (calls of 3, 3, 1 steps: log every 3,
  checkpoint at 6 and the end; the stacked batches sharded on their batch axis) give the run of
  one step per call: the logged losses, checkpoints and final parameters."""
  res = _run_on_8_devices(_STEPS_PER_CALL_TRAIN, tmp_path)
  (l1, l3), n = res["losses"], res["n"]
  assert res["devices"] == 8 and res["steps"] == [7, 7] and n > 10
  assert res["checkpoints"] == [["6", "7"], ["6", "7"]]
  assert res["calls"] == [[1] * 7, [3, 3, 1]]
  assert sorted(l1) == sorted(l3) == ["3", "6", "7"]
  for step in l1:
    assert abs(l1[step] - l3[step]) <= 1e-5 * abs(l1[step]), (step, l1[step], l3[step])
  assert res["rel"] <= 1e-4, res["rel"]
  assert "never applies" not in res["stderr"]


def test_eight_devices_match_one(request, tmp_path):
  # (a checkpoint written on several devices restoring on one, and training on from it, is
  # tests/test_multiprocess.py::test_two_process_checkpoint_restores_in_one_process)
  eight = _run_worker(tmp_path / "eight", 4, tmp_path / "eight.npz", devices=8, mesh="2,4,1")
  straight = request.getfixturevalue("tiny_run")   # late: the other worker may be training it meanwhile
  one = straight["params"]                         # the same run on this single-device process
  assert int(eight["num_devices"]) == 8 and jax.device_count() == 1
  l1, l8 = _losses(straight["workdir"]), _losses(tmp_path / "eight")
  assert sorted(l1) == sorted(l8) == [1, 2, 3, 4]
  for step in range(1, 5):
    assert abs(l1[step] - l8[step]) <= 1e-5 * abs(l1[step]), (step, l1[step], l8[step])
  assert one.keys() == set(eight) - {"num_devices"} and len(one) > 10
  for k in one:
    np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)


_SCAN_TRAIN = """
import json, os, sys, numpy as np, jax
from asymflow_jax import trainer
from tests import train_config
out = {}
for scan in (False, True):
  c = train_config.tiny_train_config(3, repa=True)   # REPA features after block 1
  c.model.depth = 6                                  # blocks 1-2 and 3-5 are scanned runs
  c.model.scan_layers, c.sample.num_images = scan, 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 4, 1
  workdir = os.path.join(sys.argv[1], str(scan))
  state = trainer.train(c, workdir, progress=False).state
  losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  out[scan] = (losses, [np.asarray(a) for a in jax.tree.leaves(state.params)])
(l0, p0), (l1, p1) = out[False], out[True]
print(json.dumps(dict(devices=jax.device_count(), losses=[l0, l1], n=len(p0),
                      rel=train_config.max_rel_diff(p0, p1))))
"""


def test_layer_scan_trains_like_unrolled_on_8_devices(tmp_path):
  """3 steps of the tiny REPA run (depth 6) on a 2 x 4 mesh: the scanned backbone (batch-sharding
  constraints inside the loop) gives the unrolled run's losses and parameters."""
  res = _run_on_8_devices(_SCAN_TRAIN, tmp_path)
  (l0, l1), n = res["losses"], res["n"]
  assert res["devices"] == 8 and len(l0) == len(l1) == 3 and n > 50
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  assert res["rel"] <= 1e-4, res["rel"]


_SPLASH_TRAIN = """
import json, os, sys, numpy as np, jax
from asymflow_jax import experiment, sharding, trainer
from tests import train_config
out = {}
for impl in ("einsum", "splash"):
  c = train_config.tiny_train_config(2)
  c.model.attention_impl, c.sample.num_images = impl, 0
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2   # batch over 4, the 2 heads over tensor
  workdir = os.path.join(sys.argv[1], impl)
  state = trainer.train(c, workdir, progress=False).state
  losses = [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  model = experiment.build(c, sharding.make_mesh(c.mesh), training=True).model
  out[impl] = (losses, [np.asarray(a) for a in jax.tree.leaves(state.params)], str(getattr(model.batch_sharding, "spec", None)))
(l0, p0, spec0), (l1, p1, spec) = out["einsum"], out["splash"]
print(json.dumps(dict(devices=jax.device_count(), losses=[l0, l1], n=len(p0), spec=spec, spec0=spec0,
                      rel=train_config.max_rel_diff(p0, p1))))
"""


def test_splash_attention_trains_like_einsum_on_a_2x2x2_mesh(tmp_path):
  """2 train steps of the tiny run on a (data 2, fsdp 2, tensor 2) mesh with the splash kernel
  (Pallas interpreter; shard_map over the batch and the heads) give the einsum run's losses and parameters."""
  res = _run_on_8_devices(_SPLASH_TRAIN, tmp_path)
  (l0, l1), n = res["losses"], res["n"]
  assert res["devices"] == 8 and len(l0) == len(l1) == 2 and n > 20
  # the kernel's shard_map batch axes (the unrolled einsum model has none)
  assert res["spec"] == "P(('data', 'fsdp'), None, None)" and res["spec0"] == "None"
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  assert res["rel"] <= 1e-4, res["rel"]


def test_nonfinite_loss_is_reported_and_not_saved(tmp_path, monkeypatch):
  # (which quantity is non-finite, the step skip and its record: tests/test_train_step_hand.py; here the
  # train loop's report. The tiny config's own program: a NaN pixel, not an absurd lr, breaks step 1.)
  monkeypatch.setattr(data_pipeline, "make_pipeline",
                      fault_worker.faulty_make_pipeline(data_pipeline.make_pipeline, "nan_pixel", 1))
  with pytest.raises(FloatingPointError, match=r"non-finite loss and gradient and update at step 1 .*no checkpoint "
                                               r"was written after it \(latest: step None\)"):
    trainer.train(tiny_train_config(4), str(tmp_path), progress=False)
  assert not (tmp_path / "checkpoints" / "2").exists() and not (tmp_path / "samples").exists()


def _klein_9b_param_counts(lora_rank=256):
  """AsymFLUX.2 klein 9B parameter counts from the architecture (D = 4096, M = 3D, 8 double + 24 single
  blocks, text width 12288, head dim 128, lifted to pixel tokens of c = 16 * 16 * 3 = 768), written out
  independently of the code: (frozen lifted base, trained subset + LoRA)."""
  d, m, hd, c, txt, t = 4096, 12288, 128, 768, 12288, 256
  double = 8 * d * d + 2 * (d * 2 * m + m * d) + 4 * hd          # attn (q k v out, added q k v out), ff x2, q/k norms
  single = d * (3 * d + 2 * m) + (d + m) * d + 2 * hd            # fused [q k v | gate up], to_out, q/k norms
  rest = c * d + txt * d + d * c + (t * d + d * d) + (6 + 6 + 3 + 2) * d * d   # in, context, out, time, modulations
  frozen = 8 * double + 24 * single + rest
  lora = lambda i, o: lora_rank * (i + o)                         # noqa: E731
  trained = (c * d + d * c + d * 2 * d                        # x_embedder, proj_out, norm_out (pixel patch 16, RGB)
             + 8 * 2 * (lora(d, 2 * m) + lora(m, d))              # ff / ff_context linear_in, linear_out
             + lora(t, d) + lora(d, d)                            # time embedder linear_1, linear_2
             + 24 * lora(d + m, d))                               # single blocks attn.to_out
  return frozen, trained


def test_pod_train_steps_lower_on_8_fake_devices(tmp_path):
  """ImageNet H/16 + REPA (DINOv2-B inside the step) and the AsymFLUX.2 klein 9B finetuning step (VR
  teacher + LPIPS + LoRA) lower with abstract inputs on an 8-device fake mesh; shardings and sizes as designed."""
  out = tmp_path / "lower.json"
  env = subprocess_env(8)
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "lower_worker.py"), str(out), "h16", "asymflux2"],
                        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(out.read_text())["h16"]
  assert info["devices"] == 8 and info["num_blocks"] == 32
  assert info["num_params"] == 952_514_368  # JiT-H/16 (the paper's 953M)
  assert info["has_bf16"]                  # bf16 compute is in the lowered program
  # FSDP over the fsdp axis; the Adam moments follow their parameters; the step counters are replicated
  assert info["qkv_spec"] == "PartitionSpec('fsdp', 'tensor')" or info["qkv_spec"] == "P('fsdp', 'tensor')"
  specs = info["opt_specs"]
  assert {v for k, v in specs.items() if ".mu[" in k or ".nu[" in k} == {info["qkv_spec"]}
  assert {v for k, v in specs.items() if k.endswith("count")} == {"P()"}
  # REPA: the 3-layer projector 1280 -> 2048 -> 2048 -> 768 is trained and FSDP-sharded like the backbone;
  # the frozen DINOv2-B/14 (bf16) sits in the step, its stacked layers sharded by the same rules
  assert info["projector_params"] == (1280 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 768 + 768)
  assert info["projector_spec"] == "P('tensor', 'fsdp')"
  d, m, tokens = 768, 3072, 1 + (518 // 14) ** 2
  layer = 4 * (d * d + d) + 2 * d + (d * m + m) + (m * d + d) + 4 * d   # qkv+out, scales, mlp, 2 norms
  assert info["encoder_params"] == 2 * d + (14 * 14 * 3 * d + d) + tokens * d + 12 * layer + 2 * d
  assert info["encoder_dtypes"] == ["bfloat16"] and info["has_dinov2_input"]
  assert info["encoder_qkv_spec"] == "P(None, 'fsdp', 'tensor')"

  flux = json.loads(out.read_text())["asymflux2"]
  assert (flux["frozen_params"], flux["trained_params"]) == _klein_9b_param_counts()
  assert flux["trained"] == ["lora", "norm_out", "proj_out", "x_embedder"]
  # stacked layers unsharded, FSDP on the hidden axis, heads on tensor; LoRA A / B: their kernel's axes + fsdp
  assert flux["to_q_spec"] == "P(None, 'fsdp', 'tensor')"
  assert (flux["lora_a_spec"], flux["lora_b_spec"]) == ("P(None, 'fsdp', None)", "P(None, None, ('fsdp', 'tensor'))")
  assert flux["proj_out_spec"] == "P('fsdp', None)"
  assert flux["has_bf16"] and flux["has_while"]      # bf16 compute; the blocks are scanned (one loop body)


def test_mesh_recipes_and_config_args():
  from configs import imagenet256_h16, imagenet256_b16, default  # noqa: PLC0415
  h = imagenet256_h16.get_config("v5p-64")
  assert (h.mesh.data, h.mesh.fsdp, h.mesh.tensor, h.model.remat) == (1, -1, 1, False)
  h = imagenet256_h16.get_config("h100")
  assert (h.mesh.data, h.mesh.fsdp, h.model.remat) == (-1, 8, True)
  assert imagenet256_b16.get_config("h100").model.remat is False
  # remat as the AOT table of launch/README.md decided: off wherever the compiled step fits without it
  assert imagenet256_h16.get_config("v5e-64").model.remat is False      # 13.41 of 16 GiB compiled
  assert imagenet256_h16.get_config("v4-32").model.remat is True        # 64 images per 32 GiB chip
  assert imagenet256_b16.get_config("v4-32").model.remat is False       # 13.21 of 32 GiB compiled
  small = default.get_config("runlocal")
  assert small.num_steps == 4 and small.batch_size == 8
  with pytest.raises(ValueError, match=r"unknown config argument 'v9-9'"):
    default.get_config("v9-9")
  from configs import asymflux2_klein  # noqa: PLC0415
  k = asymflux2_klein.get_config("v5p-64")   # LPIPS one image per chip at a time (launch/README.md)
  assert (k.mesh.data, k.mesh.fsdp, k.vr.lpips_chunks, k.batch_size) == (1, 32, 8, 256)
  assert asymflux2_klein.get_config("v5p-128").vr.lpips_chunks == 1
  # the paper's batch divides every recipe's data x fsdp on its slice
  for devices, recipe in [(16, "v4-32"), (64, "v5e-64"), (16, "v5p-32"), (32, "v5p-64"), (64, "v6e-64"), (16, "h100")]:
    c = imagenet256_h16.get_config(recipe)
    config_lib.validate_config(c, num_devices=devices)


@pytest.mark.parametrize("rank,projected_init", [(0, True), (16, False)])
def test_rank_zero_and_full_rank_checkpoint_and_resume(tmp_path, rank, projected_init):
  # r = 0 (JiT x0-prediction, an empty (D, 0) basis) and r = D (velocity prediction) train, save and resume
  def config(grid=True):
    c = tiny_train_config(4)
    c.model.rank, c.model.projected_init = rank, projected_init
    c.sample.num_images = c.sample.num_images if grid else 0   # one end-of-run grid (the resumed run's)
    return c
  straight = trainer.train(config(grid=False), str(tmp_path / "a"), progress=False).state
  resumed = _resume_after_a_kill(tmp_path / "a", tmp_path / "b", config())
  assert straight.basis.shape == resumed.basis.shape == (16, rank)
  assert int(resumed.step) == 4
  for k, v in flat_params(straight.params).items():
    np.testing.assert_array_equal(flat_params(resumed.params)[k], v, err_msg=k)
  assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
  assert (tmp_path / "b" / "samples" / "step_0000004.png").exists()
