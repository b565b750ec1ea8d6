"""Subspace tools against the reference PCA/Procrustes fixture and independent derivations."""

import dataclasses
import json
import re

import numpy as np
import pytest

from asymflow_jax import asymflow as af
from asymflow_jax import subspace as sub
from asymflow_jax.data import sources
from asymflow_jax.subspace.__main__ import main as subspace_cli


@pytest.fixture(scope="module")
def pca_fixture(fixtures_dir):
  with np.load(fixtures_dir / "pca_tiny.npz") as f:
    return {k: f[k] for k in f.files}


def _model_space_batches(images_nchw, batch_size):
  x = images_nchw.transpose(0, 2, 3, 1) * 2.0 - 1.0
  return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


@pytest.mark.parametrize("name,patch,rank", [("p8_r8", 8, 8), ("p4_r5", 4, 5)])
def test_pca_matches_reference(pca_fixture, name, patch, rank):
  batches = _model_space_batches(pca_fixture["images"], batch_size=24)  # uneven last batch on purpose
  gram, count = sub.patch_gram(batches, patch)
  assert count == 64 * (32 // patch) ** 2
  ref_gram = pca_fixture[f"{name}/gram"]
  assert np.max(np.abs(gram - ref_gram)) / np.max(np.abs(ref_gram)) < 1e-6
  ref_evals = pca_fixture[f"{name}/eigvals_ascending"]
  s = sub.pca_subspace(_model_space_batches(pca_fixture["images"], 24), patch, rank)
  assert s.basis.shape == (patch * patch * 3, rank) and s.basis.dtype == np.float32
  np.testing.assert_allclose(s.projector(), pca_fixture[f"{name}/projector"], atol=1e-5)
  # float32 batch Grams: eigenvalues are exact to float32 round-off relative to the top one
  np.testing.assert_allclose(s.eigenvalues, ref_evals, rtol=0, atol=1e-6 * ref_evals[-1])
  assert s.provenance == {"method": "pca", "num_tokens": 64 * (32 // patch) ** 2}
  exact = sub.pca_subspace(_model_space_batches(pca_fixture["images"], 24), patch, rank, float64=True)
  np.testing.assert_allclose(exact.eigenvalues, ref_evals, rtol=1e-9, atol=1e-9 * ref_evals[-1])
  np.testing.assert_allclose(exact.projector(), pca_fixture[f"{name}/projector"], atol=1e-6)
  # columns in ascending eigenvalue order like the reference: the last column is the top direction
  ref_top = pca_fixture[f"{name}/proj_mat"][:, -1].astype(np.float64)
  assert abs(abs(float(s.basis[:, -1] @ ref_top)) - 1.0) < 1e-5


def test_gram_does_not_depend_on_batching(pca_fixture):
  g1, _ = sub.patch_gram(_model_space_batches(pca_fixture["images"], 64), 8)
  g7, _ = sub.patch_gram(_model_space_batches(pca_fixture["images"], 7), 8)
  assert np.max(np.abs(g1 - g7)) / np.max(np.abs(g1)) < 1e-6


def test_gram_equals_independent_float64_sum():
  rng = np.random.default_rng(0)
  imgs = rng.uniform(-1, 1, (5, 8, 8, 2)).astype(np.float32)
  gram, count = sub.patch_gram([imgs[:2], imgs[2:]], 4)
  toks = []
  for b in range(5):  # explicit (py, px, c) packing
    for i in range(2):
      for j in range(2):
        toks.append(imgs[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :].reshape(-1))
  toks = np.asarray(toks, np.float64)
  assert count == 20
  np.testing.assert_allclose(gram, toks.T @ toks, rtol=1e-6, atol=1e-6)


def test_procrustes_matches_reference(pca_fixture):
  images = pca_fixture["images"].transpose(0, 2, 3, 1) * 2.0 - 1.0
  latents = pca_fixture["procrustes/latents"].transpose(0, 2, 3, 1)
  pairs = [(images[i:i + 16], latents[i:i + 16]) for i in range(0, 64, 16)]
  s = sub.procrustes_subspace(pairs, patch_size=8, latent_patch_size=2)
  assert s.packing == "channel_first" and s.basis.shape == (192, 16)
  # U = B A^T is sign-invariant, so the matrix itself is comparable
  np.testing.assert_allclose(s.basis, pca_fixture["procrustes/proj_mat"], atol=2e-5)
  assert abs(s.scale - float(pca_fixture["procrustes/scale"][0])) < 1e-5 * s.scale
  assert s.provenance == {"method": "procrustes", "num_tokens": 64 * 16, "latent_patch_size": 2}
  # streaming statistics equal the reference sums
  stats = sub.ProcrustesStats()
  for im, la in pairs:
    stats.update(af.patchify(la, 2, channel_first=True).reshape(-1, 16),
                 af.patchify(im, 8, channel_first=True).reshape(-1, 192))
  np.testing.assert_allclose(stats.cross, pca_fixture["procrustes/cross_gram"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(stats.latent_norm_sq, pca_fixture["procrustes/latent_norm_sq"], rtol=1e-6)
  assert stats.count == 64 * 16


def test_procrustes_recovers_a_known_rotation():
  # pixel tokens that are an exact scaled isometric image of the latents: x = s * z Q^T
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.standard_normal((12, 4)))
  z = rng.standard_normal((500, 4))
  basis, scale = sub.procrustes_basis(z.T @ (2.5 * z @ q.T), (2.5 * z @ q.T).T @ (2.5 * z @ q.T),
                                      float(np.sum(z * z)))
  np.testing.assert_allclose(basis, q, atol=1e-6)
  assert abs(scale - 2.5) < 1e-6
  # latents with |z|^2 < 1 (no floor on the norm above 1e-12), and no pixel energy: the floor 1e-12 on s^2
  z = z[:10] * 1e-2
  assert np.sum(z * z) < 0.1
  _, scale = sub.procrustes_basis(z.T @ (2.5 * z @ q.T), (2.5 * z @ q.T).T @ (2.5 * z @ q.T), float(np.sum(z * z)))
  assert abs(scale - 2.5) < 1e-6
  _, scale = sub.procrustes_basis(z.T @ (2.5 * z @ q.T), np.zeros((12, 12)), float(np.sum(z * z)))
  assert scale == pytest.approx(1e-6, rel=1e-9)  # sqrt(1e-12): still a valid (positive) scale


def test_packing_permutation_maps_between_orders():
  img = np.random.default_rng(0).standard_normal((1, 4, 4, 3)).astype(np.float32)
  dit = np.asarray(af.patchify(img, 4))[0, 0]
  cf = np.asarray(af.patchify(img, 4, channel_first=True))[0, 0]
  np.testing.assert_array_equal(cf[sub.packing_permutation(4, 3, "channel_first", "dit")], dit)
  np.testing.assert_array_equal(dit[sub.packing_permutation(4, 3, "dit", "channel_first")], cf)
  s = sub.random_subspace(48, 5, seed=1, patch_size=4)
  s_cf = s.with_packing("channel_first")
  # the same subspace: projecting the same patch gives the same pixels in either packing
  proj_dit = dit.astype(np.float64) @ s.projector()
  proj_cf = cf.astype(np.float64) @ s_cf.projector()
  np.testing.assert_allclose(proj_cf[sub.packing_permutation(4, 3, "channel_first", "dit")], proj_dit, atol=1e-5)
  for src, dst in (("nchw", "dit"), ("dit", "nchw")):
    with pytest.raises(ValueError, match=r"packing must be one of \('dit', 'channel_first'\), got 'nchw'"):
      sub.packing_permutation(4, 3, src, dst)
  with pytest.raises(ValueError, match=r"packing must be one of \('dit', 'channel_first'\), got 'nchw'"):
    sub.Subspace(basis=s.basis, patch_size=4, packing="nchw")


def test_random_subspace_is_orthonormal_seeded_and_isotropic():
  a = sub.random_subspace(16, 4, seed=0)
  np.testing.assert_allclose(a.T.astype(np.float64) @ a, np.eye(4), atol=1e-6)
  np.testing.assert_array_equal(a, sub.random_subspace(16, 4, seed=0))
  assert not np.allclose(a, sub.random_subspace(16, 4, seed=1))
  # Haar measure: the mean projector is (r/D) I; with 400 draws the entries are within ~0.02
  mean = np.mean([(lambda u: u @ u.T)(sub.random_subspace(16, 4, seed=s).astype(np.float64)) for s in range(400)], 0)
  assert np.max(np.abs(mean - 0.25 * np.eye(16))) < 0.03


def test_subspace_file_round_trip_and_validation(tmp_path):
  s = sub.random_subspace(48, 5, seed=2, patch_size=4)
  path = str(tmp_path / "s.npz")
  s.save(path)
  t = sub.Subspace.load(path)
  np.testing.assert_array_equal(t.basis, s.basis)
  assert (t.rank, t.patch_size, t.channels, t.scale, t.packing) == (5, 4, 3, 1.0, "dit")
  assert t.provenance == {"method": "random", "seed": 2} and t.eigenvalues is None
  # every field survives the file, and a file without the optional arrays gets the defaults
  full = sub.Subspace(basis=np.eye(3)[:, ::-1], patch_size=1, scale=0.5, packing="channel_first",
                      eigenvalues=np.array([0.25, 1.0, 3.0]), provenance={"z": [1, 2], "a": "x"})
  full.save(str(tmp_path / "nested" / "full.npz"))
  t = sub.Subspace.load(str(tmp_path / "nested" / "full.npz"))
  np.testing.assert_array_equal(t.basis, np.eye(3)[:, ::-1])
  assert (t.patch_size, t.scale, t.packing, t.provenance) == (1, 0.5, "channel_first", {"z": [1, 2], "a": "x"})
  assert t.eigenvalues.dtype == np.float64
  np.testing.assert_array_equal(t.eigenvalues, [0.25, 1.0, 3.0])
  np.savez(tmp_path / "bare.npz", basis=np.eye(3)[:, :2], rank=2, patch_size=1, scale=np.float32(2))
  t = sub.Subspace.load(str(tmp_path / "bare.npz"))
  assert (t.rank, t.scale, t.packing, t.eigenvalues, t.provenance) == (2, 2.0, "dit", None, {})
  bad = str(tmp_path / "bad.npz")
  np.savez(bad, basis=2 * s.basis, rank=5, patch_size=4, scale=np.float32(1), provenance=json.dumps({}))
  with pytest.raises(ValueError, match="not orthonormal"):
    sub.Subspace.load(bad)
  np.savez(bad, basis=s.basis, rank=4, patch_size=4, scale=np.float32(1))
  with pytest.raises(ValueError, match=r"rank=4 but basis has shape \(48, 5\)"):
    sub.Subspace.load(bad)
  np.savez(bad, basis=s.basis, rank=5)
  with pytest.raises(ValueError, match=r"lacks the arrays \['patch_size', 'scale'\]"):
    sub.Subspace.load(bad)
  np.savez(bad, basis=s.basis.astype(object), rank=5, patch_size=4, scale=np.float32(1))
  with pytest.raises(ValueError, match="allow_pickle=False"):  # a subspace file is never unpickled
    sub.Subspace.load(bad)
  with pytest.raises(ValueError, match=r"D=48 is not p\*p\*C for patch_size=5"):
    sub.Subspace(basis=s.basis, patch_size=5)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sub.Subspace.load(str(tmp_path / "missing.npz"))


def test_rank_errors():
  with pytest.raises(ValueError, match=r"rank must be an integer in \[0, D=16\], got 17"):
    sub.random_subspace(16, 17, seed=0)
  with pytest.raises(ValueError, match=r"got -1"):
    sub.top_eigenvectors(np.eye(4), -1)


def test_cli_pca_random_info(tmp_path, capsys, pca_fixture):
  images = str(tmp_path / "imgs.npz")
  np.savez(images, images=(pca_fixture["images"] * 255).round().astype(np.uint8))  # NCHW uint8
  out = str(tmp_path / "pca.npz")
  assert subspace_cli(["pca", "--images", images, "--patch-size", "8", "--rank", "8", "--batch-size", "10",
                   "--out", out]) == 0
  s = sub.Subspace.load(out)
  assert s.provenance["method"] == "pca" and s.provenance["num_images"] == 64
  # uint8 quantisation moves the projector only slightly at this spectral gap
  assert np.max(np.abs(s.projector() - pca_fixture["p8_r8/projector"])) < 2e-2
  assert subspace_cli(["random", "--patch-size", "4", "--channels", "1", "--rank", "3", "--out",
                   str(tmp_path / "r.npz")]) == 0
  assert sub.Subspace.load(str(tmp_path / "r.npz")).basis.shape == (16, 3)
  capsys.readouterr()
  assert subspace_cli(["info", out]) == 0
  text = capsys.readouterr().out
  assert "rank 8, dim 192 (patch 8, 3 channels)" in text
  recovery = float(text.split("oracle recovery max |u - (eps - x0)| = ")[1].split()[0])
  assert recovery < 1e-4
  with pytest.raises(ValueError, match=r"rank must be an integer in \[0, D=192\], got 500"):
    subspace_cli(["pca", "--images", images, "--patch-size", "8", "--rank", "500", "--out", out])


def test_cli_procrustes(tmp_path, pca_fixture):
  images, latents = str(tmp_path / "i.npy"), str(tmp_path / "l.npy")
  np.save(images, pca_fixture["images"])
  np.save(latents, pca_fixture["procrustes/latents"])
  out = str(tmp_path / "p.npz")
  assert subspace_cli(["procrustes", "--images", images, "--latents", latents, "--patch-size", "8",
                   "--latent-patch-size", "2", "--out", out]) == 0
  s = sub.Subspace.load(out)
  np.testing.assert_allclose(s.basis, pca_fixture["procrustes/proj_mat"], atol=2e-5)
  assert abs(s.scale - float(pca_fixture["procrustes/scale"][0])) < 1e-4


def test_subspace_is_frozen_and_accepts_patch_size_one():
  s = sub.Subspace(basis=np.eye(3, 2), patch_size=1)  # one-pixel patches: D = C = 3
  assert (s.dim, s.rank, s.patch_size, s.channels) == (3, 2, 1, 3)
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.scale = 2.0  # with_packing may hand back the same object, so a Subspace must not change
  with pytest.raises(ValueError, match=r"D=3 is not p\*p\*C for patch_size=0"):
    sub.Subspace(basis=np.eye(3, 2), patch_size=0)


def test_random_subspace_folds_the_signs_of_r_into_q():
  r_diags = []
  for seed in (0, 1):
    g = np.random.default_rng(seed).standard_normal((4, 3))
    r_diags.append(np.diag(np.linalg.qr(g)[1]))
    u = sub.random_subspace(4, 3, seed=seed).astype(np.float64)
    r = u.T @ g  # G = U R with R upper triangular and a positive diagonal: the unique such QR
    np.testing.assert_allclose(u @ r, g, atol=1e-6)
    np.testing.assert_allclose(np.tril(r, -1), 0, atol=1e-6)
    assert np.all(np.diag(r) > 0.1)
  # precondition: LAPACK's R diagonals hold entries in (-1, 0) and (0, 1), so the bound 0 of the fold matters
  r_diags = np.concatenate(r_diags)
  assert np.any((r_diags > -1) & (r_diags < 0)) and np.any((r_diags > 0) & (r_diags < 1))
  full = sub.random_subspace(4, 4, seed=0)  # rank = D is allowed: a random rotation
  np.testing.assert_allclose(full.T.astype(np.float64) @ full, np.eye(4), atol=1e-6)
  assert sub.random_subspace(4, 0, seed=0).shape == (4, 0)  # and rank 0


def test_top_eigenvectors_ascending_full_rank_and_shape_errors():
  basis, evals = sub.top_eigenvectors(np.diag([3.0, 1.0, 2.0]), 2)
  np.testing.assert_array_equal(evals, [1.0, 2.0, 3.0])
  np.testing.assert_allclose(np.abs(basis), [[0, 1], [0, 0], [1, 0]])  # e2 (2), then the top e0 (3)
  basis, evals = sub.top_eigenvectors(np.diag([3.0, 1.0, 2.0]), 3)
  np.testing.assert_allclose(np.abs(basis), [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
  assert sub.top_eigenvectors(np.diag([3.0, 1.0, 2.0]), 0)[0].shape == (3, 0)
  with pytest.raises(ValueError, match=r"gram must be square, got shape \(4,\)"):
    sub.top_eigenvectors(np.ones(4), 1)
  with pytest.raises(ValueError, match=r"gram must be square, got shape \(3, 4\)"):
    sub.top_eigenvectors(np.ones((3, 4)), 1)


def test_procrustes_stats_sums_counts_and_shape_errors():
  rng = np.random.default_rng(5)
  z1, x1 = rng.standard_normal((3, 2)), rng.standard_normal((3, 5))
  z2, x2 = rng.standard_normal((4, 2)), rng.standard_normal((4, 5))
  stats = sub.ProcrustesStats().update(z1, x1).update(z2, x2)
  z, x = np.concatenate([z1, z2]), np.concatenate([x1, x2])
  assert stats.count == 7
  np.testing.assert_allclose(stats.cross, z.T @ x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.pixel_gram, x.T @ x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats.latent_norm_sq, np.sum(z * z), rtol=1e-6)
  square = sub.ProcrustesStats().update(z1, x1[:, :2])  # d = D is allowed
  np.testing.assert_allclose(square.cross, z1.T @ x1[:, :2], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"paired \(n, d\) and \(n, D\) arrays, got shapes \(3, 2\) and \(4, 5\)"):
    sub.ProcrustesStats().update(z1, x2)
  with pytest.raises(ValueError, match=r"got shapes \(3,\) and \(3, 5\)"):
    sub.ProcrustesStats().update(z1[:, 0], x1)
  with pytest.raises(ValueError, match=r"got shapes \(3, 2\) and \(3,\)"):
    sub.ProcrustesStats().update(z1, x1[:, 0])
  with pytest.raises(ValueError, match=r"latent dimension d=4 exceeds pixel dimension D=3; expected d <= D"):
    sub.ProcrustesStats().update(np.ones((6, 4)), np.ones((6, 3)))


def test_procrustes_grid_mismatch_names_both_grids():
  images, latents = np.zeros((2, 16, 8, 3), np.float32), np.zeros((2, 6, 4, 2), np.float32)
  msg = "pixel grid 4x2 (images (16, 8), patch 4) != latent grid 3x2 (latents (6, 4), patch 2)."
  with pytest.raises(ValueError, match=re.escape(msg)):
    sub.procrustes_subspace([(images, latents)], patch_size=4, latent_patch_size=2)


def test_load_image_array_layouts_keys_and_ranges(tmp_path):
  rng = np.random.default_rng(0)

  def roundtrip(arr, name="a.npy"):
    np.save(tmp_path / name, arr)
    return sub.load_image_array(str(tmp_path / name))

  for c in (1, 3, 4):  # NHWC with H = 4 (a channel-like size) stays as it is
    a = rng.integers(0, 256, (2, 4, 6, c), dtype=np.uint8)
    np.testing.assert_array_equal(roundtrip(a), a.astype(np.float32) / 255)
  for c in (1, 3, 4):  # NCHW becomes NHWC
    a = rng.integers(0, 256, (2, c, 6, 5), dtype=np.uint8)
    np.testing.assert_array_equal(roundtrip(a), a.transpose(0, 2, 3, 1).astype(np.float32) / 255)
  a = rng.integers(0, 256, (2, 5, 6), dtype=np.uint8)  # NHW: one channel added
  np.testing.assert_array_equal(roundtrip(a), a[..., None].astype(np.float32) / 255)
  f = np.zeros((2, 4, 6, 1), np.float32)
  f[0, 0, 0], f[1, 2, 3] = 1.0, 0.25  # floats may touch both ends of [0, 1]
  np.testing.assert_array_equal(roundtrip(f), f)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got range \[-0.5, 1\]"):
    roundtrip(np.where(f == 0.25, -0.5, f))
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got range \[0, 1.5\]"):
    roundtrip(f * 1.5)
  with pytest.raises(ValueError, match=r"must be a 4-D array, got shape \(2, 1, 4, 6, 1\)"):
    roundtrip(f[:, None])
  # .npz: "images" when present, wherever it is; else the first array; else the named key
  imgs, other = f, np.full((2, 4, 6, 1), 0.5, np.float32)
  np.savez(tmp_path / "k.npz", labels=other, images=imgs)
  np.testing.assert_array_equal(sub.load_image_array(str(tmp_path / "k.npz")), imgs)
  np.testing.assert_array_equal(sub.load_image_array(str(tmp_path / "k.npz"), "labels"), other)
  np.savez(tmp_path / "n.npz", first=other, second=imgs)
  np.testing.assert_array_equal(sub.load_image_array(str(tmp_path / "n.npz")), other)
  np.savez(tmp_path / "one.npz", only=imgs)
  np.testing.assert_array_equal(sub.load_image_array(str(tmp_path / "one.npz")), imgs)
  with pytest.raises(ValueError, match=r"has no array 'x'; it has \['first', 'second'\]"):
    sub.load_image_array(str(tmp_path / "n.npz"), "x")
  with pytest.raises(FileNotFoundError, match=r"missing.npy' does not exist"):
    sub.load_image_array(str(tmp_path / "missing.npy"))


def test_load_image_array_embedded_mnist():
  raw, _ = sources.load_mnist_5k()  # 28x28 uint8 digits
  mnist = sub.load_image_array("mnist")
  assert mnist.shape == (5000, 32, 32, 1) and mnist.dtype == np.float32
  np.testing.assert_array_equal(mnist[:, 2:30, 2:30, 0], raw.astype(np.float32) / 255)
  border = mnist.copy()
  border[:, 2:30, 2:30] = 0
  assert not border.any()  # a zero border of 2 pixels


def test_iterate_batches_subsets_and_model_space():
  arrays = np.ones((5, 2, 3, 1), np.float32) * (np.arange(5, dtype=np.float32) / 8)[:, None, None, None]

  def indices(batches):  # image i holds i / 8, i.e. i / 4 - 1 in model space
    out = []
    for b in batches:
      np.testing.assert_array_equal(b, np.broadcast_to(b[:, :1, :1], b.shape))
      out.append([round(float(v)) for v in (b[:, 0, 0, 0] + 1) * 4])
    return out

  batches = list(sub.iterate_batches(arrays, 2))
  assert indices(batches) == [[0, 1], [2, 3], [4]]
  np.testing.assert_array_equal(batches[0][1], np.full((2, 3, 1), 0.25 - 1.0))
  assert indices(sub.iterate_batches(arrays, 2, num=3)) == [[0, 1], [2]]
  assert indices(sub.iterate_batches(arrays, 4, num=9)) == [[0, 1, 2, 3], [4]]
  subsets = {}
  for seed in (1, 3):
    subset = sum(indices(sub.iterate_batches(arrays, 2, num=3, seed=seed)), [])
    assert subset == sorted(set(subset)) and len(subset) == 3 and set(subset) <= set(range(5))
    assert subset == sum(indices(sub.iterate_batches(arrays, 3, num=3, seed=seed)), [])  # reproducible
    subsets[seed] = subset
  assert subsets[1] != subsets[3] and [0, 1, 2] not in subsets.values()  # the seed picks a random subset


def test_bad_inputs_found_by_the_mutation_run_are_refused(tmp_path):
  # (reported by the subspace mutation session: these used to pass silently)
  with pytest.raises(ValueError, match=r"patch_size must be an integer, got 2.5"):
    sub.Subspace(basis=np.eye(12)[:, :2], patch_size=2.5)
  assert sub.Subspace(basis=np.eye(12)[:, :2], patch_size=np.int64(2)).patch_size == 2
  images = np.full((2, 4, 4, 1), 0.5, np.float32)
  images[1, 2, 3, 0], images[0, 0, 0, 0] = np.nan, np.inf
  np.save(tmp_path / "bad.npy", images)
  with pytest.raises(ValueError, match=r"hold 2 non-finite values \(NaN or inf\); expected values in \[0, 1\]"):
    sub.load_image_array(str(tmp_path / "bad.npy"))
  q = np.linalg.qr(np.random.default_rng(0).standard_normal((12, 4)))[0]
  with pytest.raises(ValueError, match=r"the latents have no energy \(sum of \|z\|\^2 = 0.0\)"):
    sub.procrustes_basis(np.zeros((4, 12)), q @ q.T, 0.0)
