"""Tests for asymflow_jax.models.autoencoder (small conv autoencoder for the latent demo). CPU only."""

import jax
import numpy as np
import pytest

from asymflow_jax.data import sources
from asymflow_jax.models import autoencoder as ae

NUM_TRAIN, NUM_HELD_OUT, STEPS = 1000, 100, 150


def to_float(images):
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def _digits():
  src = sources.MnistSource(pad_to=32)
  return np.stack([src[i]["image"] for i in range(NUM_TRAIN + NUM_HELD_OUT)])   # uint8 [N, 32, 32, 1]


@pytest.fixture(scope="module")
def trained():
  images = _digits()
  train, held = images[:NUM_TRAIN], images[NUM_TRAIN:]
  logged = []
  variables = ae.train_autoencoder(train, steps=STEPS, batch_size=16, lr=5e-3, seed=0,
                                   progress=lambda step, m: logged.append((step, m)))
  return variables, train, held, logged


def test_shapes_range_and_reconstruction(trained):
  variables, train, held, logged = trained
  assert [s for s, _ in logged][-1] == STEPS and all(np.isfinite(m["loss"]) for _, m in logged)
  z = ae.encode(variables, held)
  assert z.shape == (NUM_HELD_OUT, 8, 8, 4) and z.dtype == np.float32
  x = ae.decode(variables, z)
  assert x.shape == (NUM_HELD_OUT, 32, 32, 1) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
  # uint8 and float inputs in [-1, 1] are the same thing.
  np.testing.assert_allclose(ae.encode(variables, to_float(held)), z, atol=1e-5)
  # Reconstruction on held-out digits is far better than predicting the mean training image.
  mean_mse = float(np.mean((to_float(train).mean(0) - to_float(held)) ** 2))
  err = ae.reconstruction_error(variables, held)
  np.testing.assert_allclose(err["mse"], np.mean((np.asarray(x, np.float64) - to_float(held)) ** 2), rtol=1e-5)
  assert err["mse"] < 0.4 * mean_mse, (err, mean_mse)
  assert err["psnr"] == pytest.approx(10 * np.log10(4 / err["mse"]))


def test_latent_normalisation_is_unit_scale_on_training_images(trained):
  variables, train, _, _ = trained
  stats = variables["latent_stats"]
  assert stats["mean"].shape == stats["std"].shape == (4,) and np.all(np.asarray(stats["std"]) > 0)
  z = ae.encode_in_batches(variables, to_float(train), batch_size=500)
  np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
  np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1.0, atol=1e-3)
  # encode = (raw - mean) / std and decode undoes it: compare with identity-normalisation variables.
  identity = {"params": variables["params"], "latent_stats": {"mean": np.zeros(4, np.float32),
                                                              "std": np.ones(4, np.float32)}}
  raw = ae.encode_in_batches(identity, to_float(train), batch_size=500)
  np.testing.assert_allclose(z, (raw - np.asarray(stats["mean"])) / np.asarray(stats["std"]), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ae.decode(variables, z[:NUM_HELD_OUT]), ae.decode(identity, raw[:NUM_HELD_OUT]),
                             atol=1e-5)
  # Chunked (the last chunk padded) == one call.
  np.testing.assert_allclose(ae.encode_in_batches(variables, train[:NUM_HELD_OUT], batch_size=30),
                             ae.encode(variables, train[:NUM_HELD_OUT]), atol=1e-5)


def test_training_is_deterministic_per_seed(trained):
  _, train, _, _ = trained
  a, b = (ae.train_autoencoder(train, steps=3, batch_size=16, seed=1) for _ in range(2))
  jax.tree.map(np.testing.assert_array_equal, a, b)
  fresh = ae.init_autoencoder(jax.random.PRNGKey(1))
  assert not np.array_equal(a["params"]["enc0"]["kernel"], fresh["params"]["enc0"]["kernel"])   # it trained


def test_save_load_round_trip(trained, tmp_path):
  variables, _, held, _ = trained
  path = tmp_path / "sub" / "ae.msgpack"
  ae.save_autoencoder(path, variables, steps=STEPS, note="demo")
  loaded, meta = ae.load_autoencoder(str(path))
  assert meta == {"steps": STEPS, "note": "demo"}
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, variables))
  z = ae.encode(variables, held)
  np.testing.assert_array_equal(ae.encode(loaded, held), z)
  np.testing.assert_array_equal(ae.decode(loaded, z), ae.decode(variables, z))
  assert [p.name for p in path.parent.iterdir()] == ["ae.msgpack"]   # no temporary file left behind
  (tmp_path / "junk").write_bytes(b"not msgpack at all")
  with pytest.raises(ValueError, match="not an autoencoder file"):
    ae.load_autoencoder(tmp_path / "junk")


def test_save_load_through_epath_remote_path(trained, monkeypatch):
  """gs:// paths go through etils.epath (served here by an in-memory fsspec filesystem)."""
  import fsspec.implementations.memory   # pylint: disable=import-outside-toplevel
  from etils.epath import backend   # pylint: disable=import-outside-toplevel
  fs = fsspec.implementations.memory.MemoryFileSystem()
  fs.store.clear()
  fs.pseudo_dirs.clear()
  fs.pseudo_dirs.append("")
  monkeypatch.setattr(backend._FileSystemSpecBackend, "fs", lambda self, path: fs)   # pylint: disable=protected-access
  variables = trained[0]
  ae.save_autoencoder("gs://bucket/models/ae.msgpack", variables)
  loaded, meta = ae.load_autoencoder("gs://bucket/models/ae.msgpack")
  assert meta == {}
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, variables))


def test_init_config_and_argument_errors(trained, tmp_path):
  variables = trained[0]
  shapes = jax.eval_shape(lambda k: ae.init_autoencoder(k, {"latent_channels": 3, "channels": (8, 16)}), jax.random.PRNGKey(0))
  config = ae.config_from_variables(shapes)
  assert (config.latent_channels, config.channels, config.num_channels) == (3, (8, 16), 1)
  z = ae.encode(variables, np.zeros((2, 16, 24, 1), np.uint8))   # any H, W divisible by 4
  assert z.shape == (2, 4, 6, 4) and ae.decode(variables, z).shape == (2, 16, 24, 1)
  with pytest.raises(ValueError, match=r"images have shape \(2, 30, 32, 1\); expected \[B, H, W, 1\]"):
    ae.encode(variables, np.zeros((2, 30, 32, 1), np.float32))
  with pytest.raises(ValueError, match=r"latents have shape \(2, 8, 8, 3\); expected \[B, h, w, 4\]"):
    ae.decode(variables, np.zeros((2, 8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="dtype int32; expected uint8 or float"):
    ae.encode(variables, np.zeros((1, 8, 8, 1), np.int32))
  with pytest.raises(ValueError, match="image_size=30 is not divisible by 4"):
    ae.make_config(image_size=30)
  with pytest.raises(ValueError, match=r"channels=\(8,\)"):
    ae.make_config(channels=(8,))
  with pytest.raises(ValueError, match=r"unknown autoencoder config fields \['latent_chanels'\]"):
    ae.make_config({"latent_chanels": 4})
  with pytest.raises(ValueError, match="steps=0: expected an integer >= 1"):
    ae.train_autoencoder(np.zeros((4, 32, 32), np.uint8), steps=0)
  with pytest.raises(ValueError, match=r"lr=-1\.0"):
    ae.train_autoencoder(np.zeros((4, 32, 32), np.uint8), steps=1, lr=-1.0)
  # A file whose shapes disagree with its stored architecture is rejected.
  path = tmp_path / "ae.msgpack"
  ae.save_autoencoder(path, variables)
  from flax import serialization   # pylint: disable=import-outside-toplevel
  payload = serialization.msgpack_restore(path.read_bytes())
  payload["config"]["latent_channels"] = 5
  path.write_bytes(serialization.msgpack_serialize(payload))
  with pytest.raises(ValueError, match="do not match the autoencoder"):
    ae.load_autoencoder(path)
