"""DINOv2: float32 parity with transformers' Dinov2Model / Dinov2WithRegistersModel (fixture from
tests/make_dinov2_fixture.py) at the native size and interpolated sizes, the bicubic position-embedding
interpolation against an independent float64 NumPy implementation and torch, and the checkpoint importer."""

import json
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax import dinov2_import, flux2_import
from asymflow_jax.models import dinov2

RTOL = 1e-5
VARIANTS = ("plain", "registers")
CASES = [f"{v}_{s}" for v in VARIANTS for s in ("native", "up", "down")]


def rel_err(actual, expected):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  meta = json.loads((fixtures_dir / "dinov2_tiny.json").read_text())
  with np.load(fixtures_dir / "dinov2_tiny.npz") as z:
    arrays = dict(z)
  cases = {case: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(case + "/")}
           for case in list(meta["cases"]) + ["interp"]}
  return meta, cases


@pytest.fixture(scope="module")
def folders(fixtures_dir):
  return {v: fixtures_dir / "dinov2_tiny_hf" / v for v in VARIANTS}


@pytest.fixture(scope="module")
def models(folders):
  """variant -> (model, params streamed from the folder: plain float32 single file, registers bf16 sharded)."""
  out = {}
  for variant, folder in folders.items():
    model = dinov2.Dinov2Model(dinov2_import.read_hf_dinov2_config(folder))
    out[variant] = (model, dinov2_import.load_hf_dinov2(folder))
  return out


def _pixels(case):
  return case["pixel_values"].transpose(0, 2, 3, 1)   # the fixture stores torch's NCHW


@pytest.fixture(scope="module")
def results(fixture, models):
  """case -> (last_hidden_state, hidden_states), plus "plain_native_bf16" -> the bfloat16-compute output; one
  jitted program per variant runs all its cases (compiling dominates this file's runtime)."""
  meta, cases = fixture
  out = {}
  for variant, (model, params) in models.items():
    names = [c for c in CASES if meta["cases"][c]["variant"] == variant]
    bf16 = dinov2.Dinov2Model(model.config, dtype=jnp.bfloat16)

    def run(p, xs, model=model, bf16=bf16):
      res = [dinov2.apply_with_intermediates(model, p, x) for x in xs]
      return res, bf16.apply({"params": p}, xs[0])

    res, low = jax.device_get(jax.jit(run)(params, [_pixels(cases[c]) for c in names]))
    out.update(zip(names, res))
    out[f"{variant}_native_bf16"] = low
  return out


def test_configs_match_the_fixture(fixture, folders):
  meta, _ = fixture
  assert dinov2_import.read_hf_dinov2_config(folders["plain"]) == dinov2.dinov2_tiny()
  assert dinov2_import.read_hf_dinov2_config(folders["registers"]) == dinov2.dinov2_tiny(registers=True)
  assert dinov2.Dinov2Config.from_dict(meta["configs"]["plain"]) == dinov2.dinov2_tiny()
  regs = dinov2.Dinov2Config.from_dict(dict(meta["configs"]["registers"], model_type="dinov2_with_registers"))
  assert regs == dinov2.dinov2_tiny(registers=True)
  assert regs.num_prefix_tokens == 4 and regs.mlp_hidden == 88 and regs.antialias_pos_embed
  base = dinov2.dinov2_base()
  assert (base.grid, base.num_patches, base.head_dim, base.mlp_hidden) == (37, 1369, 64, 3072)
  assert dinov2.param_count(base) == 86_580_480          # facebook/dinov2-base (mask token included)
  assert dinov2.dinov2_giant().mlp_hidden == 4096
  with pytest.raises(ValueError, match="register tokens"):
    dinov2.Dinov2Config(num_register_tokens=4)
  with pytest.raises(ValueError, match="hidden_act"):
    dinov2.Dinov2Config(hidden_act="quick_gelu")


@pytest.mark.parametrize("case", CASES)
def test_parity_with_transformers(fixture, results, case):
  expected = fixture[1][case]
  out, hidden = results[case]
  err_out = rel_err(out, expected["last_hidden_state"])
  assert err_out <= RTOL, f"{case}/last_hidden_state: relative error {err_out:.3g}"
  for i in range(hidden.shape[0]):
    err = rel_err(hidden[i], expected["hidden_states"][i])
    assert err <= RTOL, f"{case}/hidden_states[{i}]: relative error {err:.3g}"
  cfg = dinov2.dinov2_tiny(registers=case.startswith("registers"))
  h, w = fixture[0]["cases"][case]["height"], fixture[0]["cases"][case]["width"]
  assert dinov2.patch_tokens(out, cfg).shape == (2, (h // 4) * (w // 4), 32)


@pytest.mark.parametrize("case", CASES)
def test_position_embeddings_match_transformers(fixture, models, case):
  expected = fixture[1][case]
  variant = fixture[0]["cases"][case]["variant"]
  model, params = models[variant]
  h, w = expected["pixel_values"].shape[2:]
  pos = dinov2.interpolate_pos_encoding(params["embeddings"]["position_embeddings"], h // 4, w // 4,
                                        model.config.antialias_pos_embed)
  assert rel_err(pos, expected["pos_embed"]) <= 1e-6


# ------------------------------------------------------------------- bicubic, independently in float64


def _cubic64(x, a):
  """Keys' cubic convolution kernel, written out piecewise in powers of |x|."""
  x = abs(x)
  if x <= 1:
    return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
  if x < 2:
    return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
  return 0.0


def _torch_bicubic_ref(grid, out_h, out_w):
  """torch bicubic, align_corners=False, antialias=False: A = -0.75 over the border-replicated grid, source
  coordinate (i + 0.5) in / out - 0.5; a direct 2-D sum per output pixel. grid (H, W, D) float64."""
  h, w, _ = grid.shape
  pad = 3
  padded = np.pad(grid, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  out = np.zeros((out_h, out_w, grid.shape[2]))
  for i in range(out_h):
    sy = (i + 0.5) * h / out_h - 0.5
    for j in range(out_w):
      sx = (j + 0.5) * w / out_w - 0.5
      acc = 0.0
      for y in range(-pad, h + pad):
        wy = _cubic64(sy - y, -0.75)
        if wy == 0:
          continue
        for x in range(-pad, w + pad):
          acc = acc + wy * _cubic64(sx - x, -0.75) * padded[y + pad, x + pad]
      out[i, j] = acc
  return out


def _pil_bicubic_ref(grid, out_h, out_w):
  """torch's antialiased bicubic (PIL's filter): A = -0.5, support 2 max(in/out, 1), taps inside the grid only,
  weights renormalised; separable, one axis at a time."""
  def axis(n_in, n_out):
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
      center = (i + 0.5) * scale
      m[i] = [_cubic64((j + 0.5 - center) / stretch, -0.5) for j in range(n_in)]
      m[i] /= m[i].sum()
    return m
  return np.einsum("ay,yxd,bx->abd", axis(grid.shape[0], out_h), grid, axis(grid.shape[1], out_w))


@pytest.mark.parametrize("n_in,size", [(7, (3, 5)), (7, (11, 9)), (37, (16, 16)), (16, (37, 37))])
def test_bicubic_matches_float64_reference(n_in, size):
  """(37, 16): REPA's dinov2-base table at 224 px."""
  grid = np.random.default_rng(1).standard_normal((n_in, n_in, 2))
  for antialias, ref in ((False, _torch_bicubic_ref), (True, _pil_bicubic_ref)):
    r_h = dinov2.bicubic_resize_matrix(grid.shape[0], size[0], antialias)
    r_w = dinov2.bicubic_resize_matrix(grid.shape[1], size[1], antialias)
    got = np.einsum("ay,yxd,bx->abd", r_h, grid, r_w)
    np.testing.assert_allclose(got, ref(grid, *size), rtol=0, atol=1e-12)
    np.testing.assert_allclose(r_h.sum(axis=1), 1.0, atol=1e-12)
  assert np.array_equal(dinov2.bicubic_resize_matrix(7, 7), np.eye(7))


def test_bicubic_matches_torch(fixture):
  interp = fixture[1]["interp"]
  grid = interp["grid"][0].transpose(1, 2, 0).astype(np.float64)          # (7, 7, 3)
  for name, size in (("down", (3, 5)), ("up", (11, 9))):
    for aa in (False, True):
      r_h, r_w = (dinov2.bicubic_resize_matrix(7, n, aa) for n in size)
      got = np.einsum("ay,yxd,bx->abd", r_h, grid, r_w)
      want = interp[name + ("_aa" if aa else "")][0].transpose(1, 2, 0)
      assert rel_err(got, want) <= 1e-6, (name, aa)


# ------------------------------------------------------------------------------------ model extras


def test_mask_token_and_bfloat16_compute(fixture, models, results):
  model, params = models["plain"]
  x = _pixels(fixture[1]["plain_native"])
  emb = dinov2.Embeddings(model.config)
  masked = emb.apply({"params": params["embeddings"]}, x, np.ones((2, 16), bool))
  e = params["embeddings"]
  np.testing.assert_allclose(masked[:, 1:], jnp.broadcast_to(e["mask_token"] + e["position_embeddings"][0, 1:],
                                                             (2, 16, 32)), rtol=1e-6, atol=1e-6)
  for variant in VARIANTS:
    low = results[f"{variant}_native_bf16"]
    assert low.dtype == np.float32 and rel_err(low, results[f"{variant}_native"][0]) < 5e-2


def test_params_carry_logical_axes():
  specs = dinov2.param_specs(dinov2.Dinov2Model(dinov2.dinov2_tiny(registers=True)))
  layer = specs["encoder"]["layer"]
  assert tuple(layer["attention"]["attention"]["query"]["kernel"]) == ("layers", "embed", "heads")
  assert tuple(layer["attention"]["output"]["dense"]["kernel"]) == ("layers", "heads", "embed")
  assert tuple(layer["mlp"]["weights_in"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(layer["layer_scale1"]["lambda1"]) == ("layers", "embed")
  assert tuple(specs["embeddings"]["patch_embeddings"]["projection"]["kernel"]) == (None, None, None, "embed")
  assert tuple(specs["layernorm"]["scale"]) == ("embed",)


# ------------------------------------------------------------------------------------------ import


def test_key_mapping():
  src = dinov2_import.param_source(("encoder", "layer", "attention", "attention", "query", "kernel"), (2, 32, 32))
  assert src.keys == (("encoder.layer.0.attention.attention.query.weight",),
                      ("encoder.layer.1.attention.attention.query.weight",))
  assert src.stacked and src.perm == (1, 0) and src.torch_shape((2, 32, 16)) == (16, 32)
  src = dinov2_import.param_source(("embeddings", "patch_embeddings", "projection", "kernel"), (14, 14, 3, 768))
  assert src.keys == (("embeddings.patch_embeddings.projection.weight",),) and src.torch_shape((14, 14, 3, 768)) == (
      768, 3, 14, 14)
  src = dinov2_import.param_source(("encoder", "layer", "norm1", "scale"), (2, 32))
  assert src.keys[1] == ("encoder.layer.1.norm1.weight",) and src.perm is None
  src = dinov2_import.param_source(("encoder", "layer", "mlp", "weights_in", "kernel"), (2, 32, 176), "transformers5")
  assert src.keys[0] == ("encoder.layer.0.mlp.gate_proj.weight", "encoder.layer.0.mlp.up_proj.weight")
  assert src.expected((2, 32, 176))["encoder.layer.1.mlp.up_proj.weight"] == (88, 32)
  assert dinov2_import.param_source(("layernorm", "bias"), (32,)).keys == (("layernorm.bias",),)


def test_streamed_import_equals_the_in_memory_mapping(models, folders):
  for variant, folder in folders.items():
    model, params = models[variant]
    state = flux2_import.read_state_dict(folder)
    ref = dinov2_import.state_dict_to_params(state, model.config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, ref)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
    back = dinov2_import.params_to_state_dict(params, model.config)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
      np.testing.assert_array_equal(back[k], np.asarray(v, np.float32))
  bf16 = dinov2_import.load_hf_dinov2(folders["registers"], models["registers"][0], dtype=jnp.bfloat16)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), bf16,
               models["registers"][1])


def test_transformers5_names_are_recognised(models, folders, tmp_path):
  """A file written from transformers 5's in-memory state dict (q_proj / gate_proj + up_proj names)."""
  model, params = models["registers"]
  state = dinov2_import.params_to_state_dict(params, model.config, naming="transformers5")
  assert "encoder.layer.1.attention.o_proj.weight" in state and "encoder.layer.0.mlp.gate_proj.bias" in state
  shutil.copy(folders["registers"] / "config.json", tmp_path / "config.json")
  flux2_import.save_safetensors(tmp_path / "model.safetensors", state)
  again = dinov2_import.load_hf_dinov2(tmp_path)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, params)


def test_mismatched_folder_lists_every_problem(models, tmp_path):
  model, params = models["plain"]
  state = dinov2_import.params_to_state_dict(params, model.config)
  del state["encoder.layer.1.layer_scale2.lambda1"]
  state["encoder.layer.2.norm1.weight"] = np.ones((32,), np.float32)
  state["embeddings.position_embeddings"] = state["embeddings.position_embeddings"][:, :10]
  flux2_import.save_safetensors(tmp_path / "model.safetensors", state)
  (tmp_path / "config.json").write_text(json.dumps(dict(model.config.to_dict(), layer_norm_eps=1e-5,
                                                        architectures=["Dinov2Model"])))
  with pytest.raises(ValueError) as err:
    dinov2_import.load_hf_dinov2(tmp_path, model.config)
  msg = str(err.value)
  assert "4 problems" in msg
  assert "missing key encoder.layer.1.layer_scale2.lambda1" in msg
  assert "unexpected key encoder.layer.2.norm1.weight" in msg
  assert "wrong shape for embeddings.position_embeddings: (1, 10, 32)" in msg
  assert "config layer_norm_eps" in msg
  with pytest.raises(ValueError, match="3 problems"):
    dinov2_import.load_hf_dinov2(tmp_path, model.config, check_config=False)
  with pytest.raises(ValueError, match="3 problems"):
    dinov2_import.load_hf_dinov2(tmp_path)          # the folder's own config


def test_sliced_reads_and_mesh_loading(models, folders):
  """Each shard reads only its block: _read_slice of any index equals the slice of the full Flax-layout array
  (transposed Linear, permuted conv kernel, stacked layers, concatenated transformers-5 SwiGLU parts)."""
  model, params = models["registers"]
  for naming in ("hub", "transformers5"):
    state = dinov2_import.params_to_state_dict(params, model.config, naming=naming)
    sources = dinov2_import.param_sources(model.config, naming)
    for path in [("embeddings", "patch_embeddings", "projection", "kernel"),
                 ("encoder", "layer", "attention", "attention", "key", "kernel"),
                 ("encoder", "layer", "mlp", "weights_in", "kernel"), ("encoder", "layer", "norm2", "bias")]:
      src, leaf = sources[path]
      full = params
      for k in path:
        full = full[k]
      index = tuple(slice(1, None) if i % 2 else slice(0, max(1, n // 2)) for i, n in enumerate(leaf.shape))
      block = dinov2_import._read_slice(lambda k: state[k], src, index, np.float32)  # pylint: disable=protected-access
      np.testing.assert_array_equal(block, np.asarray(full)[index])
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
  on_mesh = dinov2_import.load_hf_dinov2(folders["registers"], shardings=mesh)
  assert isinstance(on_mesh["encoder"]["layer"]["mlp"]["weights_in"]["kernel"].sharding, jax.sharding.NamedSharding)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), on_mesh, params)
