"""asymflow_jax.aot: slice names, per-chip numbers against independent counts, and (with libtpu) a TPU compile."""

import json
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax import aot
from asymflow_jax import experiment
from asymflow_jax import objective
from asymflow_jax import sharding as shd
from tests.train_config import tiny_train_config

CONFIG = "--config=tests/train_config.py"


def test_slice_names_give_the_chip_grid_memory_and_peak():
  cases = {   # name: (chips, libtpu topology, wrap-around, HBM GiB, bf16 TFLOP/s) -- Cloud TPU's slice tables
      "v4-32": (16, "v4:2x2x4", (False,) * 3, 32, 275),
      "v5p-64": (32, "v5:2x4x4", (False,) * 3, 95, 459),
      "v5p-128": (64, "v5:4x4x4", (True,) * 3, 95, 459),
      "v5e-64": (64, "v5e:8x8", (False,) * 3, 16, 197),
      "v6e-256": (256, "v6e:16x16", (True, True, False), 32, 918),
  }
  for name, (chips, grid, wrap, hbm, tflops) in cases.items():
    t = aot.parse_topology(name)
    assert (t.platform, t.chips, t.libtpu_name, t.wrap) == ("tpu", chips, grid, wrap), name
    assert t.hbm_bytes == hbm * 2 ** 30 and t.peak_flops == tflops * 1e12, name
  assert aot.parse_topology("cpu-8").chips == 8 and aot.parse_topology("cpu-8").platform == "cpu"
  for bad, needle in (("v5p-63", "no v5p slice of that size here; expected one of v5p-8, v5p-16"),
                      ("v7x-8", "expected a TPU slice name"), ("cpu-0", "expected a TPU slice name")):
    with pytest.raises(ValueError, match=needle):
      aot.parse_topology(bad)


def test_forward_flops_match_xla_cost_analysis():
  # the analytic count (matmuls + attention) against XLA's own count of the compiled forward, which
  # also counts the elementwise work (norms, softmax, SwiGLU gate): within a few percent at hidden 256
  c = tiny_train_config()
  m = c.model
  m.hidden_size, m.num_heads, m.depth, m.bottleneck_dim = 256, 4, 2, 32
  model = experiment.model_from_config(c)
  b = 4
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((b, 32, 32, 1)), jnp.ones((b,)),
                                             jnp.zeros((b,), jnp.int32)))
  fwd = jax.jit(lambda p, x, t, y: model.apply(p, x, t, y, train=False)).lower(
      params, jax.ShapeDtypeStruct((b, 32, 32, 1), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.float32),
      jax.ShapeDtypeStruct((b,), jnp.int32)).compile()
  xla = aot.xla_flops(fwd)
  analytic = model.config.forward_flops(b)
  assert 1.0 <= xla / analytic <= 1.1, (xla, analytic)


def _argument_bytes(exp, batch: dict) -> int:
  """Per-device bytes of the step's inputs, from the shardings (independent of XLA's analysis)."""
  total = 0
  for leaf in jax.tree.leaves(exp.target()) + list(batch.values()):
    dtype = leaf.dtype
    itemsize = 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).itemsize
    total += int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * itemsize
  return total


def test_cpu_compile_reports_the_step_per_chip(capsys, tmp_path):
  out = tmp_path / "aot.json"
  assert aot.main([CONFIG, "--topology=cpu-1", "--config.batch_size=8", f"--out={out}"]) == 0
  printed = capsys.readouterr().out
  fields = json.loads(out.read_text())
  assert json.loads(printed.strip().splitlines()[-1]) == fields and "FLOPs / chip / step" in printed
  assert fields["chips"] == 1 and fields["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  assert fields["batch_size"] == 8 and "fits" not in fields   # a CPU has no HBM budget to fit
  c = tiny_train_config()
  exp = experiment.build(c, shd.make_mesh(c.mesh), training=True)
  assert fields["bytes_per_chip"]["argument"] == _argument_bytes(exp, objective.abstract_batch(exp))
  m = fields["bytes_per_chip"]
  assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  # train step = forward + backward (~2x) + optimizer: 3x the forward's model FLOPs, a little more
  # from the elementwise work; remat is off, so the ceiling is that ratio
  model_flops = 3 * exp.model.config.forward_flops(8)
  assert fields["model_flops_per_chip"] == model_flops
  assert 1.0 <= fields["flops_per_chip"] / model_flops <= 1.6
  assert fields["mfu_ceiling"] == pytest.approx(model_flops / fields["flops_per_chip"])


def test_bad_arguments_fail_before_compiling(capsys, monkeypatch):
  assert aot.main([CONFIG, "--topology=v5p-63"]) == 2
  assert "no v5p slice of that size" in capsys.readouterr().err
  monkeypatch.setitem(sys.modules, "libtpu", None)    # as if the optional extra were not installed
  assert aot.main([CONFIG, "--topology=v5p-8"]) == 2
  assert "pip install .[tpu-aot]" in capsys.readouterr().err
  assert aot.main([CONFIG, "--topology=cpu-8"]) == 2   # this test process has one CPU device
  assert "this process has 1 CPU devices" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    aot.main([CONFIG, "--topology=cpu-1", "--batch_size=3"])
  assert "config overrides are --config.a.b=value" in capsys.readouterr().err


def test_tpu_v5p_compile_with_libtpu(capsys, tmp_path):
  pytest.importorskip("libtpu", reason="the optional extra `pip install .[tpu-aot]` (libtpu) is not installed")
  out = tmp_path / "aot.json"
  assert aot.main([CONFIG, "--topology=v5p-8", "--config.batch_size=16", f"--out={out}", "--sampler",
                   "--sampler_batch=8"]) == 0
  fields = json.loads(out.read_text())
  assert fields["chips"] == 4 and fields["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert fields["fits"] is True and fields["hbm_bytes"] == 95 * 2 ** 30
  work = max(fields["flops_per_chip"], fields["model_flops_per_chip"])
  assert fields["step_time_lower_bound_s"] == work / 459e12
  assert fields["flops_per_chip"] > 0 and fields["sampler"]["batch"] == 8
  # TPU layouts pad small arrays to tiles: at least the sharded input bytes
  c = tiny_train_config()
  c.batch_size = 16
  exp = experiment.build(c, shd.make_mesh(c.mesh, aot.devices(aot.parse_topology("v5p-8"))), training=True)
  assert fields["bytes_per_chip"]["argument"] >= _argument_bytes(exp, objective.abstract_batch(exp))
