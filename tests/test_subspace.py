"""Subspace tools against the reference PCA/Procrustes fixture and independent derivations."""

import json

import numpy as np
import pytest

from asymflow_jax import asymflow as af
from asymflow_jax import subspace as sub
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
  # streaming statistics equal the reference sums
  stats = sub.ProcrustesStats()
  for im, la in pairs:
    stats.update(af.patchify(la, 2, channel_first=True).reshape(-1, 16),
                 af.patchify(im, 8, channel_first=True).reshape(-1, 192))
  np.testing.assert_allclose(stats.cross, pca_fixture["procrustes/cross_gram"], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(stats.latent_norm_sq, pca_fixture["procrustes/latent_norm_sq"], rtol=1e-6)


def test_procrustes_recovers_a_known_rotation():
  # pixel tokens that are an exact scaled isometric image of the latents: x = s * z Q^T
  rng = np.random.default_rng(3)
  q, _ = np.linalg.qr(rng.standard_normal((12, 4)))
  z = rng.standard_normal((500, 4))
  basis, scale = sub.procrustes_basis(z.T @ (2.5 * z @ q.T), (2.5 * z @ q.T).T @ (2.5 * z @ q.T),
                                      float(np.sum(z * z)))
  np.testing.assert_allclose(basis, q, atol=1e-6)
  assert abs(scale - 2.5) < 1e-6


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
  assert t.provenance == {"method": "random", "seed": 2}
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
