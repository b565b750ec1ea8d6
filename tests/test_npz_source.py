"""Tests for the npz data source (images + cached latents) in asymflow_jax.data. CPU only, offline."""

import json

import numpy as np
import pytest

from asymflow_jax import data
from asymflow_jax.data import pipeline, sources

N = 40


def float_arrays(n=N, size=8, channels=1, seed=0):
  """float32 images (deliberately not in [-1, 1] and not multiples of 1/127.5), latents, labels = index."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, size, size, channels)).astype(np.float32) * 3
  latents = rng.normal(size=(n, size // 4, size // 4, 3)).astype(np.float32)
  return images, np.arange(n, dtype=np.int64), latents


def npz_config(path, **kw):
  c = data.default_data_config()
  c.source, c.path, c.image_size, c.extra_keys = "npz", str(path), 8, ("latent",)
  c.update(kw)
  return c


def collect(pipe, num_batches=None):
  it = iter(pipe)
  batches = list(it) if num_batches is None else [next(it) for _ in range(num_batches)]
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture
def float_npz(tmp_path):
  images, labels, latents = float_arrays()
  path = tmp_path / "floats.npz"
  sources.write_npz_dataset(path, images, labels, latent=latents)
  return path, images, labels, latents


def test_source_records(float_npz):
  path, images, labels, latents = float_npz
  src = sources.NpzSource(path, keys=("image", "label", "latent"))
  assert len(src) == N and src.image_shape == (8, 8, 1) and src.image_dtype == np.float32
  ex = src[7]
  assert sorted(ex) == ["image", "label", "latent"] and ex["label"] == 7 and isinstance(ex["label"], int)
  np.testing.assert_array_equal(ex["image"], images[7])
  np.testing.assert_array_equal(ex["latent"], latents[7])
  assert not ex["image"].flags.writeable   # views of the in-memory arrays, protected
  assert sorted(sources.NpzSource(path)[0]) == ["image", "label"]   # extras only when asked for
  assert "floats.npz" in repr(src)
  assert sources.npz_array_info(path) == {"image": ((N, 8, 8, 1), np.dtype(np.float32)),
                                          "label": ((N,), np.dtype(np.int32)),
                                          "latent": ((N, 2, 2, 3), np.dtype(np.float32))}
  with pytest.raises(IndexError, match=rf"record index {N} out of range \[0, {N}\)"):
    src[N]


def test_float_images_and_extras_pass_through_exactly(float_npz):
  path, images, labels, latents = float_npz
  cfg = npz_config(path, shuffle=False)
  pipe = data.make_pipeline(cfg, seed=0, global_batch_size=8, process_index=0, process_count=1, num_epochs=1)
  batch = next(iter(pipe))
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 8, 8, 1)
  assert batch["latent"].dtype == np.float32 and batch["latent"].shape == (8, 2, 2, 3)
  assert batch["label"].dtype == np.int32
  got = collect(pipe)
  np.testing.assert_array_equal(got["label"], labels)
  np.testing.assert_array_equal(got["image"], images)   # bit-exact: no scaling, no crop
  np.testing.assert_array_equal(got["latent"], latents)
  # Shuffled: every record still carries its own image and latent.
  cfg.shuffle = True
  got = collect(data.make_pipeline(cfg, seed=3, global_batch_size=8, process_index=0, process_count=1,
                                   num_epochs=1))
  assert sorted(got["label"].tolist()) == list(range(N)) and not np.array_equal(got["label"], labels)
  np.testing.assert_array_equal(got["image"], images[got["label"]])
  np.testing.assert_array_equal(got["latent"], latents[got["label"]])


def test_uint8_images_are_converted_as_before(tmp_path):
  digits = np.stack([data.MnistSource(pad_to=32)[i]["image"] for i in range(64)])
  _, mnist_labels = data.load_mnist_5k()
  latents = np.random.default_rng(1).normal(size=(64, 8, 8, 4)).astype(np.float32)
  path = tmp_path / "digits.npz"
  sources.write_npz_dataset(path, digits[..., 0], mnist_labels[:64], latent=latents)   # [N, H, W] -> C = 1
  cfg = npz_config(path, image_size=32, shuffle=False)
  got = collect(data.make_pipeline(cfg, seed=0, global_batch_size=16, process_index=0, process_count=1,
                                   num_epochs=1))
  mnist_cfg = data.default_data_config()
  mnist_cfg.shuffle = False
  want = next(iter(data.make_pipeline(mnist_cfg, seed=0, global_batch_size=64, process_index=0,
                                      process_count=1)))
  np.testing.assert_array_equal(got["image"], want["image"])   # same as the embedded-MNIST pipeline
  np.testing.assert_array_equal(got["label"], want["label"])
  np.testing.assert_array_equal(got["latent"], latents)
  # Larger uint8 images still get the ADM centre crop.
  big = np.random.default_rng(2).integers(0, 256, size=(16, 12, 12, 1), dtype=np.uint8)
  sources.write_npz_dataset(tmp_path / "big.npz", big, np.zeros(16, np.int32))
  got = collect(data.make_pipeline(npz_config(tmp_path / "big.npz", extra_keys=(), shuffle=False), seed=0,
                                   global_batch_size=16, process_index=0, process_count=1, num_epochs=1))
  want = np.stack([data.to_float(data.center_crop_arr(b, 8)) for b in big])
  np.testing.assert_array_equal(got["image"], want)


def test_bad_float_image_shape_names_the_record(tmp_path):
  images, labels, latents = float_arrays(n=16, size=8)
  path = tmp_path / "wrong_size.npz"
  sources.write_npz_dataset(path, images, labels, latent=latents)
  cfg = npz_config(path, image_size=4)
  pipe = data.make_pipeline(cfg, seed=0, global_batch_size=4, process_index=0, process_count=1)
  with pytest.raises(data.BadRecordError,
                     match=r"wrong_size\.npz.* record \d+: float32 image shape \[8, 8, 1\] != \[4, 4, 1\]"):
    next(iter(pipe))
  cfg = npz_config(path, num_channels=3)
  with pytest.raises(data.BadRecordError, match=r"float32 image shape \[8, 8, 1\] != \[8, 8, 3\]"):
    next(iter(data.make_pipeline(cfg, seed=0, global_batch_size=4, process_index=0, process_count=1)))
  # Skipped and counted like any bad record (one finite epoch: all 16 skipped, no batch).
  cfg = npz_config(path, image_size=4, on_bad_record="skip")
  pipe = data.make_pipeline(cfg, seed=0, global_batch_size=4, process_index=0, process_count=1, num_epochs=1)
  assert list(iter(pipe)) == [] and pipe.bad_records.count == 16
  assert "float32 image shape" in pipe.bad_records.last_error


def test_random_flip_with_extra_keys_is_rejected(float_npz):
  path, images, _, _ = float_npz
  with pytest.raises(ValueError, match=r"random_flip=True with config.extra_keys=\('latent',\)"):
    data.make_pipeline(npz_config(path, random_flip=True), seed=0, global_batch_size=8, process_index=0,
                       process_count=1)
  # Without extras, float images flip like uint8 ones (same per-record coin).
  cfg = npz_config(path, random_flip=True, extra_keys=(), shuffle=False)
  got = collect(data.make_pipeline(cfg, seed=5, global_batch_size=8, process_index=0, process_count=1,
                                   num_epochs=1))
  flipped = [data.flip_decision(5, 0, i) for i in range(N)]
  assert 0 < sum(flipped) < N
  for i in range(N):
    np.testing.assert_array_equal(got["image"][i], images[i][:, ::-1] if flipped[i] else images[i])


@pytest.mark.parametrize("threads", [0, 2])
def test_iterator_state_restore(float_npz, threads):
  path = float_npz[0]
  cfg = npz_config(path, num_threads=threads, prefetch=4 * threads)
  make = lambda: data.make_pipeline(cfg, seed=2, global_batch_size=6, process_index=1, process_count=2)
  it = iter(make())
  for _ in range(5):   # past the end of the first epoch (20 records per process)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]
  restored = iter(make())
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    assert sorted(got) == ["image", "label", "latent"]
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_extra_keys_from_other_sources_and_missing_keys(tmp_path, float_npz):
  class ArraySource:
    def __len__(self):
      return 8

    def __getitem__(self, i):
      return {"image": np.full((8, 8, 1), i, np.uint8), "label": i, "latent": np.full((2,), i, np.float64)}

  cfg = npz_config("", source="mnist", shuffle=False)
  batch = next(iter(data.make_pipeline(cfg, seed=0, global_batch_size=8, process_index=0, process_count=1,
                                       source=ArraySource())))
  assert batch["latent"].dtype == np.float32
  np.testing.assert_array_equal(batch["latent"], np.repeat(np.arange(8.0)[:, None], 2, axis=1))
  cfg.extra_keys = ("latent", "depth")
  with pytest.raises(data.BadRecordError, match=r"record 0: has no extra array 'depth'"):
    next(iter(data.make_pipeline(cfg, seed=0, global_batch_size=8, process_index=0, process_count=1,
                                 source=ArraySource())))
  # An npz file without the requested array names the file and what it has.
  with pytest.raises(ValueError, match=r"floats\.npz: has no array\(s\) \['depth'\]; it has \['image', 'label', 'latent'\]"):
    data.make_pipeline(npz_config(float_npz[0], extra_keys=("depth",)), seed=0, global_batch_size=8,
                       process_index=0, process_count=1)


def test_config_and_file_errors(tmp_path):
  assert data.default_data_config().extra_keys == ()
  make = lambda cfg: data.make_pipeline(cfg, seed=0, global_batch_size=8, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="config.path .* is required for source='npz'"):
    make(npz_config(""))
  with pytest.raises(FileNotFoundError, match="npz dataset not found: .*missing.npz"):
    make(npz_config(tmp_path / "missing.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="junk.npz: not a readable .npz file"):
    make(npz_config(tmp_path / "junk.npz"))
  with pytest.raises(ValueError, match="junk.npz: not a readable .npz file"):
    sources.npz_array_info(tmp_path / "junk.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    sources.npz_array_info(tmp_path / "missing.npz")
  for bad in (("image",), ("latent", "latent"), ("",)):
    with pytest.raises(ValueError, match="config.extra_keys=.*expected unique names other than"):
      make(npz_config(tmp_path / "x.npz", extra_keys=bad))
  with pytest.raises(ValueError, match=r"unknown data source 'npy'; expected one of \('mnist', 'tfds', 'array_record', 'npz'\)"):
    pipeline.make_source(npz_config("x", source="npy"))
  # write_npz_dataset validates what it writes (so that every written file loads).
  images, labels, latents = float_arrays(n=4)
  with pytest.raises(ValueError, match=r"'label' is int64\[3\]; expected integers \[4\]"):
    sources.write_npz_dataset(tmp_path / "a.npz", images, labels[:3])
  with pytest.raises(ValueError, match=r"'label' is float64\[4\]"):
    sources.write_npz_dataset(tmp_path / "a.npz", images, labels.astype(np.float64))
  with pytest.raises(ValueError, match=r"extra array 'latent' has shape \[3, 2, 2, 3\]; expected \[4, \.\.\.\]"):
    sources.write_npz_dataset(tmp_path / "a.npz", images, labels, latent=latents[:3])
  with pytest.raises(ValueError, match=r"'image' is float32\[4, 8, 8\]; expected uint8"):
    sources.write_npz_dataset(tmp_path / "a.npz", images[..., 0], labels)
  with pytest.raises(ValueError, match=r"'image' is int16"):
    sources.write_npz_dataset(tmp_path / "a.npz", images.astype(np.int16), labels)
  assert not list(tmp_path.glob("a.npz*")) and not list(tmp_path.glob(".a.npz*"))
  # float64 inputs are stored as float32.
  sources.write_npz_dataset(tmp_path / "b.npz", images.astype(np.float64), labels, latent=latents.astype(np.float64))
  with np.load(tmp_path / "b.npz") as f:
    assert (f["image"].dtype, f["label"].dtype, f["latent"].dtype) == (np.float32, np.int32, np.float32)
    np.testing.assert_array_equal(f["image"], images)


def test_npz_through_epath_remote_path(monkeypatch):
  """gs:// paths go through etils.epath (served here by an in-memory fsspec filesystem)."""
  import fsspec.implementations.memory   # pylint: disable=import-outside-toplevel
  from etils.epath import backend   # pylint: disable=import-outside-toplevel
  fs = fsspec.implementations.memory.MemoryFileSystem()
  fs.store.clear()
  fs.pseudo_dirs.clear()
  fs.pseudo_dirs.append("")
  monkeypatch.setattr(backend._FileSystemSpecBackend, "fs", lambda self, path: fs)   # pylint: disable=protected-access
  images, labels, latents = float_arrays(n=8)
  sources.write_npz_dataset("gs://bucket/data/latents.npz", images, labels, latent=latents)
  assert sources.npz_array_info("gs://bucket/data/latents.npz")["latent"] == ((8, 2, 2, 3), np.dtype(np.float32))
  batch = next(iter(data.make_pipeline(npz_config("gs://bucket/data/latents.npz", shuffle=False), seed=0,
                                       global_batch_size=8, process_index=0, process_count=1)))
  np.testing.assert_array_equal(batch["image"], images)
  np.testing.assert_array_equal(batch["latent"], latents)
