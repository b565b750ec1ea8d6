"""FLUX.2 transformer: float32 parity with diffusers' Flux2Transformer2DModel (fixture from
tests/make_flux2_fixture.py), the position-id helpers, remat, and the streaming diffusers importer."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from asymflow_jax import flux2_import
from asymflow_jax.models import flux2
from tests.conftest import REPO, subprocess_env

RTOL = 1e-5
INTERMEDIATES = {  # fixture name -> path in apply_with_intermediates' dict
    "temb": ("temb",),
    "double_txt": ("transformer_blocks", "txt"),
    "double_img": ("transformer_blocks", "img"),
    "single": ("single_transformer_blocks", "hidden_states"),
    "pre_proj_out": ("pre_proj_out",),
}


def assert_close(actual, expected, what):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert err <= RTOL, f"{what}: relative error {err:.3g}"


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
  meta = json.loads((fixtures_dir / "flux2_tiny.json").read_text())
  with np.load(fixtures_dir / "flux2_tiny.npz") as z:
    arrays = dict(z)
  cases = {case: {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(case + "/")}
           for case in meta["case_variant"]}
  return meta, cases


@pytest.fixture(scope="module")
def folders(fixtures_dir):
  root = fixtures_dir / "flux2_tiny_diffusers"
  return {"klein": root / "klein", "guided": root / "guided"}


@pytest.fixture(scope="module")
def models(folders):
  """variant -> (model, params streamed from the diffusers folder: klein single-file float16, guided sharded
  bfloat16), float32."""
  out = {}
  for variant, folder in folders.items():
    model = flux2.Flux2Transformer(flux2_import.read_diffusers_config(folder))
    out[variant] = (model, flux2_import.load_diffusers_transformer(folder, model))
  return out


def _inputs(case):
  args = (case["hidden_states"], case["encoder_hidden_states"], case["timestep"], case["img_ids"],
          case["txt_ids"])
  return args, ({"guidance": case["guidance"]} if "guidance" in case else {})


@pytest.fixture(scope="module")
def results(fixture, models):
  """case -> (output, intermediates); one jitted program per variant (ids are traced arguments)."""
  meta, cases = fixture
  fns = {v: jax.jit(lambda p, *a, m=m, **kw: flux2.apply_with_intermediates(m, p, *a, **kw))
         for v, (m, _) in models.items()}
  out = {}
  for name, case in cases.items():
    variant = meta["case_variant"][name]
    args, kw = _inputs(case)
    out[name] = jax.device_get(fns[variant](models[variant][1], *args, **kw))
  return out


def test_configs_match_the_fixture(fixture, folders):
  meta, _ = fixture
  assert flux2_import.read_diffusers_config(folders["klein"]) == flux2.flux2_tiny()
  assert flux2.Flux2Config.from_dict(meta["configs"]["guided"]) == flux2.flux2_tiny(guidance_embeds=True)
  nine = flux2.flux2_klein_9b()
  assert (nine.inner_dim, nine.mlp_hidden_dim, nine.out_dim) == (4096, 12288, 128)


@pytest.mark.parametrize("case", ["klein", "klein_ref", "guided"])
def test_parity_with_diffusers(fixture, results, case):
  expected = fixture[1][case]
  out, inter = results[case]
  assert_close(out, expected["output"], f"{case}/output")
  for name, path in INTERMEDIATES.items():
    node = inter
    for k in path:
      node = node[k]
    assert_close(node, expected[name], f"{case}/{name}")


def test_rope_tables(fixture):
  _, cases = fixture
  cfg = flux2.flux2_tiny()
  for case in cases.values():
    ids = np.concatenate([case["txt_ids"], case["img_ids"]])
    host = flux2.rope_tables(ids, cfg.axes_dims_rope, cfg.rope_theta)               # float64 on the host
    traced = jax.jit(lambda i: flux2.rope_tables(i, cfg.axes_dims_rope, cfg.rope_theta))(ids)
    for got in (host, traced):
      np.testing.assert_allclose(got[0], case["rope_cos"], rtol=0, atol=1e-6)
      np.testing.assert_allclose(got[1], case["rope_sin"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(host[0], case["rope_cos"])


def test_id_helpers_match_the_pipeline(fixture):
  _, cases = fixture
  np.testing.assert_array_equal(flux2.text_ids(5), cases["klein"]["txt_ids"])
  np.testing.assert_array_equal(flux2.image_ids(4, 4), cases["klein"]["img_ids"])
  np.testing.assert_array_equal(flux2.image_ids(3, 4), cases["guided"]["img_ids"])
  np.testing.assert_array_equal(np.concatenate([flux2.image_ids(3, 4), flux2.image_ids(2, 2, t=10)]),
                                cases["klein_ref"]["img_ids"])
  assert flux2.image_ids(2, 3).tolist() == [[0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0],
                                            [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 2, 0]]


def test_remat_gives_the_same_output(fixture, models, results):
  model, params = models["klein"]
  args, _ = _inputs(fixture[1]["klein"])
  remat = flux2.Flux2Transformer(model.config, remat=True, remat_policy="dots_saveable")
  out, inter = jax.jit(lambda p, *a: flux2.apply_with_intermediates(remat, p, *a))(params, *args)
  ref_out, ref_inter = results["klein"]
  np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), inter, ref_inter)
  # both scans wrap their body in jax.checkpoint (checked on the jaxpr: compiling two backward passes
  # would dominate this file's runtime)
  jaxpr = lambda m: str(jax.make_jaxpr(lambda p: m.apply({"params": p}, *args))(params))  # noqa: E731
  assert jaxpr(remat).count("remat") == 2 and "remat" not in jaxpr(model)
  with pytest.raises(ValueError, match="remat_policy"):
    flux2.Flux2Transformer(model.config, remat=True, remat_policy="nope").init(
        jax.random.key(0), *flux2.dummy_inputs(model.config)[0])


def test_params_carry_logical_axes():
  specs = flux2.param_specs(flux2.Flux2Transformer(flux2.flux2_tiny(guidance_embeds=True)))
  assert tuple(specs["transformer_blocks"]["attn"]["to_q"]["kernel"]) == ("layers", "embed", "heads")
  assert tuple(specs["single_transformer_blocks"]["attn"]["to_qkv_mlp_proj"]["kernel"]) == ("layers", "embed", "qkv")
  assert tuple(specs["transformer_blocks"]["ff"]["linear_out"]["kernel"]) == ("layers", "mlp", "embed")
  assert tuple(specs["transformer_blocks"]["attn"]["norm_added_q"]["scale"]) == ("layers", "head_dim")
  assert tuple(specs["x_embedder"]["kernel"]) == ("patch", "embed")
  leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert all(isinstance(s, jax.sharding.PartitionSpec) and all(n is not None for n in s) for s in leaves)


def test_streamed_import_equals_the_in_memory_mapping(models, folders):
  for variant, folder in folders.items():
    model, params = models[variant]
    ref = flux2_import.state_dict_to_params(flux2_import.read_state_dict(folder), model.config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, ref)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
  bf16 = flux2_import.load_diffusers_transformer(folders["guided"], models["guided"][0].config, dtype=jnp.bfloat16)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a, np.float32), b), bf16, models["guided"][1])


def test_float32_round_trip_through_safetensors(models, folders, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  model, params = models["klein"]
  state = flux2_import.params_to_state_dict(params, model.config)
  shutil.copy(folders["klein"] / "config.json", tmp_path / "config.json")
  flux2_import.save_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
  assert sorted(load_file(tmp_path / "diffusion_pytorch_model.safetensors")) == sorted(state)
  again = flux2_import.load_diffusers_transformer(tmp_path, model.config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, params)


def test_mismatched_folder_lists_every_problem(models, tmp_path):
  model, params = models["klein"]
  state = flux2_import.params_to_state_dict(params, model.config)
  del state["single_transformer_blocks.1.attn.norm_k.weight"]
  state["transformer_blocks.2.attn.to_q.weight"] = np.ones((32, 32), np.float32)
  state["proj_out.weight"] = state["proj_out.weight"][:, :16]
  flux2_import.save_safetensors(tmp_path / "diffusion_pytorch_model.safetensors", state)
  cfg = dict(model.config.to_dict(), rope_theta=10000, _class_name="Flux2Transformer2DModel")
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError) as err:
    flux2_import.load_diffusers_transformer(tmp_path, model.config)
  msg = str(err.value)
  assert "4 problems" in msg
  assert "missing key single_transformer_blocks.1.attn.norm_k.weight" in msg
  assert "unexpected key transformer_blocks.2.attn.to_q.weight" in msg
  assert "wrong shape for proj_out.weight: (8, 16)" in msg
  assert "config rope_theta" in msg
  with pytest.raises(ValueError, match="3 problems"):
    flux2_import.load_diffusers_transformer(tmp_path, model.config, check_config=False)


def test_key_mapping():
  src = flux2_import.param_source(("transformer_blocks", "attn", "to_out", "kernel"), (3, 8, 8))
  assert src.keys == tuple(f"transformer_blocks.{i}.attn.to_out.0.weight" for i in range(3))
  assert src.stacked and src.transpose and src.torch_shape((3, 8, 6)) == (6, 8)
  src = flux2_import.param_source(("single_transformer_blocks", "attn", "to_out", "kernel"), (2, 8, 8))
  assert src.keys[1] == "single_transformer_blocks.1.attn.to_out.weight"
  src = flux2_import.param_source(("time_guidance_embed", "timestep_embedder", "linear_1", "kernel"), (4, 8))
  assert src.keys == ("time_guidance_embed.timestep_embedder.linear_1.weight",) and not src.stacked
  src = flux2_import.param_source(("transformer_blocks", "attn", "norm_added_q", "scale"), (2, 16))
  assert src.keys[0] == "transformer_blocks.0.attn.norm_added_q.weight" and not src.transpose


EIGHT_DEVICES = textwrap.dedent("""
    import sys
    import numpy as np, jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from asymflow_jax import flux2_import, sharding
    folder = sys.argv[1]
    cfg = flux2_import.read_diffusers_config(folder)
    ref = flux2_import.state_dict_to_params(flux2_import.read_state_dict(folder), cfg)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    # 1) the model's logical axes (embed -> fsdp, heads/mlp/qkv -> tensor)
    params = flux2_import.load_diffusers_transformer(folder, cfg, shardings=mesh)
    spec = params["transformer_blocks"]["attn"]["to_q"]["kernel"].sharding.spec
    assert tuple(spec) == (None, "fsdp", "tensor"), spec
    # 2) stacked params split over their layer axis: each shard reads only its layers
    def pick(x):
      return NamedSharding(mesh, P("fsdp", "tensor") if x.ndim == 3 else P())
    layered = flux2_import.load_diffusers_transformer(folder, cfg, shardings=jax.tree.map(pick, ref))
    for tree in (params, layered):
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tree, ref)
    shard = layered["single_transformer_blocks"]["attn"]["to_out"]["kernel"].addressable_shards[0]
    assert shard.data.shape == (1, 64, 32), shard.data.shape
    print("ok", len(jax.devices()))
""")


def test_import_into_an_8_device_mesh(folders):
  res = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, str(folders["guided"])], env=subprocess_env(8),
                       cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert res.returncode == 0, res.stderr[-3000:]
  assert res.stdout.split() == ["ok", "8"]
