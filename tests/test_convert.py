"""Converter tests: error reporting, file formats and an orbax round trip through the CLI."""

from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax import asymflow as af
from asymflow_jax import checkpoint
from asymflow_jax import convert
from asymflow_jax.models import asymjit_apply

from tests.conftest import FIXTURES, REPO

FIXTURE = FIXTURES / "jit_tiny.npz"


@functools.lru_cache(maxsize=None)
def fixture():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


def state_dict():
  return {k[3:]: v.copy() for k, v in fixture().items() if k.startswith("sd/")}


def test_npz_loader_strips_sd_prefix():
  sd = convert.load_state_dict(str(FIXTURE))
  assert set(sd) == set(state_dict())
  assert "in/x_t" not in sd and "x_embedder.proj1.weight" in sd


def test_layout_transforms():
  sd = state_dict()
  params, basis, scale = convert.torch_state_dict_to_flax(sd, "tiny")
  # Linear (out, in) -> kernel (in, out).
  np.testing.assert_array_equal(params["blocks_2"]["mlp"]["w3"]["kernel"], sd["blocks.2.mlp.w3.weight"].T)
  # Conv (out, c, py, px) -> kernel[(py, px, c), out]: check one element by index arithmetic.
  w = sd["x_embedder.proj1.weight"]
  o, c, py, px = 5, 2, 1, 3
  assert params["x_embedder"]["proj1"]["kernel"][(py * 4 + px) * 3 + c, o] == w[o, c, py, px]
  np.testing.assert_array_equal(params["x_embedder"]["proj2"]["kernel"], sd["x_embedder.proj2.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(basis, sd["proj_buffer"])
  assert scale == 1.0


def test_scale_buffer_optional_and_0d():
  sd = state_dict()
  sd["scale_buffer"] = np.array(0.8, np.float32)        # 0-d, as in the reference state dict
  assert convert.torch_state_dict_to_flax(sd, "tiny")[2] == pytest.approx(0.8)
  del sd["scale_buffer"]
  for k in [k for k in sd if k.startswith(("feat_rope", "x_embedder.pos_embed"))]:
    del sd[k]                                           # fixed buffers are optional
  assert convert.torch_state_dict_to_flax(sd, "tiny")[2] == 1.0


def test_rejects_corrupted_state_dict_listing_every_problem():
  sd = state_dict()
  del sd["blocks.1.attn.q_norm.weight"]
  del sd["final_layer.linear.bias"]
  sd["blocks.9.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
  sd["blocks.0.mlp.w12.weight"] = sd["blocks.0.mlp.w12.weight"][:-1]
  sd["feat_rope.base_rope.freqs_cos"] = sd["feat_rope.base_rope.freqs_cos"] + 0.5
  with pytest.raises(ValueError) as err:
    convert.torch_state_dict_to_flax(sd, "tiny")
  msg = str(err.value)
  for needle in ("missing keys (2)", "blocks.1.attn.q_norm.weight", "final_layer.linear.bias",
                 "unexpected keys (1)", "blocks.9.attn.qkv.weight",
                 "shape mismatches (1)", "blocks.0.mlp.w12.weight: got (339, 64), expected (340, 64)",
                 "inconsistent fixed buffers (1)", "feat_rope.base_rope.freqs_cos"):
    assert needle in msg, (needle, msg)


def test_rejects_state_dict_for_another_size():
  with pytest.raises(ValueError, match=r"x_embedder.proj1.weight: got \(16, 3, 4, 4\), expected \(128, 3, 16, 16\)"):
    convert.torch_state_dict_to_flax(state_dict(), "B/16")


def test_pth_without_torch_says_how_to_fix(tmp_path):
  if importlib.util.find_spec("torch") is not None:
    pytest.skip("torch is installed")
  path = tmp_path / "ckpt.pth"
  path.write_bytes(b"not a real checkpoint")
  with pytest.raises(ImportError, match="pip install torch"):
    convert.load_state_dict(str(path))


CONVERT_CONFIG = str(REPO / "configs" / "asymjit_tiny.py")


def _convert(src, workdir, *extra):
  return convert.main(["--from", "pytorch", "--checkpoint", str(src), "--config", CONVERT_CONFIG,
                       "--workdir", str(workdir), *extra])


def _safetensors(tmp_path, sd, name="asymjit_tiny.safetensors"):
  from safetensors.numpy import save_file
  src = tmp_path / name
  save_file(sd, str(src))
  return src


def test_safetensors_cli_writes_a_workdir_that_matches_the_reference(tmp_path, capsys):
  sd = state_dict()
  sd["scale_buffer"] = np.array([0.8], np.float32)      # exercises the restored scale
  src = _safetensors(tmp_path, sd)
  wd = tmp_path / "wd"
  assert _convert(src, wd) == 0
  assert "334,144 params" in capsys.readouterr().out
  assert (wd / "config.json").exists() and sorted(os.listdir(wd / "checkpoints")) == ["0"]

  # the project's own loader opens it: params (no EMA in a converted workdir), basis and scale
  config, exp, state = checkpoint.open_workdir(str(wd))
  assert config.model.rank == 4 and int(state.step) == 0
  assert float(state.scale) == pytest.approx(0.8)
  np.testing.assert_array_equal(np.asarray(state.basis), sd["proj_buffer"])

  d = fixture()
  x = jnp.asarray(d["in/x_t"].transpose(0, 2, 3, 1))
  v = jax.jit(lambda p, b: asymjit_apply(exp.model, p, x, jnp.asarray(d["in/timesteps"]),
                                         jnp.asarray(d["in/class_labels"].astype(np.int32)), b,
                                         scale=state.scale, sigma_min=af.EVAL_SIGMA_MIN))(state.params, state.basis)
  ref = d["out/eval_s0.8"].transpose(0, 2, 3, 1)
  assert float(np.max(np.abs(np.asarray(v) - ref)) / np.max(np.abs(ref))) <= 1e-5


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
  sd = state_dict()
  del sd["in_context_posemb"]
  src = _safetensors(tmp_path, sd, "broken.safetensors")
  assert _convert(src, tmp_path / "o") == 1
  err = capsys.readouterr().err
  assert err.startswith("error: state dict does not match") and "in_context_posemb" in err
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("corrupt,needle", [
    (lambda sd: sd["blocks.2.mlp.w3.weight"].__setitem__((0, 0), np.nan), "blocks_2/mlp/w3/kernel: 1 non-finite values"),
    (lambda sd: sd["final_layer.linear.bias"].__setitem__(3, np.inf), "final_layer/linear/bias: 1 non-finite values"),
    (lambda sd: sd.__setitem__("proj_buffer", sd["proj_buffer"] * 1.5), "basis columns are not orthonormal"),
    (lambda sd: sd["proj_buffer"].__setitem__((0, 0), np.nan), "basis columns are not orthonormal: max |U^T U - I| = nan"),
    (lambda sd: sd.__setitem__("scale_buffer", np.array(-0.5, np.float32)), "scale_buffer: -0.5, expected a finite number > 0"),
])
def test_cli_rejects_unusable_weights_before_writing(tmp_path, capsys, corrupt, needle):
  sd = state_dict()
  corrupt(sd)
  assert _convert(_safetensors(tmp_path, sd), tmp_path / "o") == 1
  err = capsys.readouterr().err
  assert err.startswith("error: the converted checkpoint is not usable") and needle in err, err
  assert not (tmp_path / "o").exists()


def test_cli_refuses_an_existing_workdir_and_a_rank_mismatch(tmp_path, capsys):
  src = _safetensors(tmp_path, state_dict())
  (tmp_path / "exists").mkdir()
  assert _convert(src, tmp_path / "exists") == 1
  assert "--workdir=" in capsys.readouterr().err and os.listdir(tmp_path / "exists") == []
  assert _convert(src, tmp_path / "o", "--set", "model.rank=2") == 1
  assert "proj_buffer: rank 4, but the config has model.rank=2" in capsys.readouterr().err
  assert _convert(src, tmp_path / "o", "--set", "model.rnak=2") == 1
  assert "config.model.rnak does not exist" in capsys.readouterr().err
