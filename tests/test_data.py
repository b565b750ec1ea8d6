"""Tests for asymflow_jax.data (grain pipelines, sources, prep CLI). CPU only, offline."""

import csv
import gzip
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from asymflow_jax import data
from asymflow_jax.data import prep, sources

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class IndexSource:
  """Synthetic source: record i has label i and a 4x4x1 image of value i % 256."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((4, 4, 1), i % 256, np.uint8), "label": i}


def index_config(**kw):
  c = data.default_data_config()
  c.image_size = 4
  c.update(kw)
  return c


def labels_of(pipe, num_batches):
  it = iter(pipe)
  return np.concatenate([next(it)["label"] for _ in range(num_batches)])


def raw_mnist_row(index):
  """Independent reader of one row of the embedded csv (csv module, not numpy)."""
  with gzip.open(sources.mnist_csv_path(), "rt") as f:
    for i, row in enumerate(csv.reader(f)):
      if i == index:
        values = [int(v) for v in row]
        assert len(values) == 785
        return np.array(values[:784], np.uint8).reshape(28, 28), values[784]
  raise AssertionError("row not found")


# ----------------------------------------------------------------------------
# Embedded MNIST source.
# ----------------------------------------------------------------------------


def test_mnist_source_matches_raw_csv():
  src = data.MnistSource(pad_to=32, num_channels=1)
  assert len(src) == 5000
  for index in (0, 1234, 4999):
    pixels, label = raw_mnist_row(index)
    ex = src[index]
    assert ex["label"] == label
    assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["image"][2:30, 2:30, 0], pixels)
    assert ex["image"].sum() == pixels.astype(np.int64).sum()  # Padding is zeros.
  _, labels = data.load_mnist_5k()
  assert np.bincount(labels).tolist() == [500] * 10
  rgb = data.MnistSource(pad_to=None, num_channels=3)[1234]["image"]
  assert rgb.shape == (28, 28, 3)
  np.testing.assert_array_equal(rgb[..., 2], raw_mnist_row(1234)[0])


def test_default_pipeline_batches_match_source():
  cfg = data.default_data_config()
  cfg.shuffle = False
  pipe = data.make_pipeline(cfg, seed=0, global_batch_size=16, process_index=0,
                            process_count=1)
  batch = next(iter(pipe))
  assert batch["image"].shape == (16, 32, 32, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32
  for i in (0, 7, 15):  # Unshuffled: batch element i is csv row i.
    pixels, label = raw_mnist_row(i)
    assert batch["label"][i] == label
    expected = np.zeros((32, 32), np.float32) - 1.0
    expected[2:30, 2:30] = pixels.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"][i, :, :, 0], expected, atol=1e-6)


def test_shuffled_pipeline_values_and_labels():
  pipe = data.make_pipeline(None, seed=3, global_batch_size=32, process_index=0,
                            process_count=1)
  images, labels = data.load_mnist_5k()
  lookup = {images[i].tobytes(): labels[i] for i in range(len(labels))}
  it = iter(pipe)
  for _ in range(3):
    batch = next(it)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    for img, lab in zip(batch["image"], batch["label"]):
      raw = np.round((img[2:30, 2:30, 0] + 1.0) * 127.5).astype(np.uint8)
      assert lookup[raw.tobytes()] == lab
  assert pipe.steps_per_epoch == 5000 // 32


def test_mnist_other_sizes():
  cfg = data.default_data_config()
  cfg.image_size, cfg.num_channels, cfg.shuffle = 16, 3, False
  batch = next(iter(data.make_pipeline(cfg, seed=0, global_batch_size=4,
                                       process_index=0, process_count=1)))
  assert batch["image"].shape == (4, 16, 16, 3)
  pixels, _ = raw_mnist_row(0)
  expected = data.center_crop_arr(pixels[:, :, None], 16)[:, :, 0]
  np.testing.assert_allclose(batch["image"][0, :, :, 1], data.to_float(expected))


# ----------------------------------------------------------------------------
# Shuffling and sharding.
# ----------------------------------------------------------------------------


def test_shuffle_deterministic_per_seed_and_epoch():
  n, bs = 64, 8

  def run(seed):
    return labels_of(data.make_pipeline(index_config(), seed=seed, global_batch_size=bs,
                                        process_index=0, process_count=1,
                                        source=IndexSource(n)), 2 * n // bs)

  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  epoch0, epoch1 = a[:n], a[n:]
  assert sorted(epoch0.tolist()) == list(range(n))
  assert sorted(epoch1.tolist()) == list(range(n))
  assert not np.array_equal(epoch0, epoch1)
  assert not np.array_equal(epoch0, np.arange(n))
  # Seed s epoch 1 is not seed s+1 epoch 0 (seed hashing).
  assert not np.array_equal(epoch1, c[:n])


def test_finite_epochs_and_unshuffled_order():
  cfg = index_config(shuffle=False)
  pipe = data.make_pipeline(cfg, seed=0, global_batch_size=5, process_index=0,
                            process_count=1, num_epochs=2, source=IndexSource(12))
  labels = np.concatenate([b["label"] for b in pipe])
  # 24 examples, 4 full batches of 5 (remainder dropped).
  np.testing.assert_array_equal(labels, np.concatenate([np.arange(12), np.arange(8)]))


@pytest.mark.parametrize("n", [100, 101])
def test_two_processes_get_disjoint_shards(n):
  shards = []
  for pi in range(2):
    pipe = data.make_pipeline(index_config(), seed=5, global_batch_size=10, process_index=pi,
                              process_count=2, num_epochs=1, source=IndexSource(n))
    assert pipe.local_batch_size == 5 and pipe.examples_per_process == n // 2
    shards.append(np.concatenate([b["label"] for b in pipe]))
  assert len(shards[0]) == len(shards[1]) == 50
  assert not set(shards[0].tolist()) & set(shards[1].tolist())
  union = set(shards[0].tolist()) | set(shards[1].tolist())
  assert union == set(range(100))  # Full epoch (n=101 drops the odd record out).


def test_bad_arguments():
  with pytest.raises(ValueError, match="not divisible"):
    data.make_pipeline(index_config(), seed=0, global_batch_size=9, process_index=0,
                       process_count=2, source=IndexSource(64))
  with pytest.raises(ValueError, match="on_bad_record"):
    data.make_pipeline(index_config(on_bad_record="ignore"), seed=0, global_batch_size=8,
                       process_index=0, process_count=1, source=IndexSource(64))
  with pytest.raises(ValueError, match="fewer than"):
    data.make_pipeline(index_config(), seed=0, global_batch_size=64, process_index=0,
                       process_count=2, source=IndexSource(40))
  with pytest.raises(ValueError, match="unknown data source"):
    data.make_source(index_config(source="webdataset"))


# ----------------------------------------------------------------------------
# ADM centre crop / resize.
# ----------------------------------------------------------------------------


def test_center_crop_exact_slicing_when_no_resampling():
  rng = np.random.default_rng(0)
  tall = rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(data.center_crop_arr(tall, 32), tall[4:36])
  wide = rng.integers(0, 256, (32, 51, 1), dtype=np.uint8)
  np.testing.assert_array_equal(data.center_crop_arr(wide, 32), wide[:, 9:41])
  square = rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)
  np.testing.assert_array_equal(data.center_crop_arr(square, 32), square)


def test_center_crop_box_downsample_by_two():
  # Pillow's uint8 BOX filter rounds in fixed point (up to +1 vs the exact mean),
  # so compare with numpy box averaging up to one grey level per halving.
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (64, 96, 3)).astype(np.uint8)
  # 64x96 -> BOX 32x48 (short side == 32, no further resampling) -> centre crop.
  ref = img.reshape(32, 2, 48, 2, 3).astype(np.float64).mean(axis=(1, 3))[:, 8:40]
  out = data.center_crop_arr(img, 32).astype(np.float64)
  assert out.shape == (32, 32, 3)
  assert np.abs(out - ref).max() <= 1.0 and np.abs(out - ref).mean() < 0.75
  # A shifted crop (wrong offset) or a bicubic resize would be far off.
  assert np.abs(out - img.reshape(32, 2, 48, 2, 3).mean(axis=(1, 3))[:, 0:32]).mean() > 10
  # Two halvings (4x4 box) vs a numpy 4x4 mean, up to two rounding steps.
  big = rng.integers(0, 256, (128, 128, 1)).astype(np.uint8)
  ref = big.reshape(32, 4, 32, 4, 1).astype(np.float64).mean(axis=(1, 3))
  got = data.center_crop_arr(big, 32).astype(np.float64)
  assert np.abs(got - ref).max() <= 2.0
  # Short side 60 < 2*32: bicubic to 53x32 then crop.
  odd = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
  assert data.center_crop_arr(odd, 32).shape == (32, 32, 3)


# ----------------------------------------------------------------------------
# Random flip.
# ----------------------------------------------------------------------------


def test_random_flip_probability_and_mirroring():
  def batches(flip):
    cfg = data.default_data_config()
    cfg.random_flip = flip
    it = iter(data.make_pipeline(cfg, seed=11, global_batch_size=200, process_index=0,
                                 process_count=1))
    return np.concatenate([next(it)["image"] for _ in range(5)])

  plain, flipped = batches(False), batches(True)
  is_same = np.all(plain == flipped, axis=(1, 2, 3))
  is_mirror = np.all(plain[:, :, ::-1] == flipped, axis=(1, 2, 3))
  assert np.all(is_same | is_mirror)  # Every output is the image or its mirror.
  asym = ~np.all(plain == plain[:, :, ::-1], axis=(1, 2, 3))
  frac = is_mirror[asym].mean()
  assert 0.44 < frac < 0.56, frac
  # The coin is per record and per epoch.
  coins = np.array([[data.flip_decision(11, ep, r) for r in range(400)] for ep in range(2)])
  assert 0.4 < coins.mean() < 0.6 and (coins[0] != coins[1]).any()


# ----------------------------------------------------------------------------
# Checkpointable iterator state.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("threads", [0, 2])
def test_iterator_state_restore(threads):
  cfg = data.default_data_config()
  cfg.random_flip, cfg.num_threads, cfg.prefetch = True, threads, 8 * threads
  make = lambda: data.make_pipeline(cfg, seed=2, global_batch_size=32, process_index=1,
                                    process_count=2)
  it = iter(make())
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # JSON-able.
  expected = [next(it) for _ in range(4)]
  restored = iter(make())  # A fresh pipeline, as after a restart.
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  # And the restored stream is not simply the start of the stream.
  first = next(iter(make()))
  assert not np.array_equal(first["label"], expected[0]["label"])


# ----------------------------------------------------------------------------
# ArrayRecord prep CLI and bad records.
# ----------------------------------------------------------------------------


def _write_png_folder(root):
  rng = np.random.default_rng(7)
  originals = {}
  for cls, shape in (("cat", (20, 24, 3)), ("dog", (30, 16, 3))):
    os.makedirs(root / cls)
    for k in range(3):
      arr = rng.integers(0, 256, shape, dtype=np.uint8)
      path = root / cls / f"img{k}.png"
      Image.fromarray(arr).save(path)
      originals[str(path)] = (arr, 0 if cls == "cat" else 1)
  return originals


def test_prep_round_trip(tmp_path):
  originals = _write_png_folder(tmp_path / "imgs")
  out = str(tmp_path / "data.array_record")
  summary = prep.prepare_array_record(str(tmp_path / "imgs"), out, labels_from_subdirs=True,
                                      progress=False)
  assert summary["num_records"] == 6 and summary["class_names"] == ["cat", "dog"]
  src = data.ArrayRecordSource(out, num_channels=3)
  assert len(src) == 6
  items, _ = prep.list_images(str(tmp_path / "imgs"), labels_from_subdirs=True)
  for i, (path, label) in enumerate(items):  # Lossless, in sorted order.
    arr, want_label = originals[path]
    assert src[i]["label"] == label == want_label
    np.testing.assert_array_equal(src[i]["image"], arr)

  # The CLI (as a module), with --size, read back through the pipeline.
  out16 = str(tmp_path / "data16.array_record")
  proc = subprocess.run(
      [sys.executable, "-m", "asymflow_jax.data.prep", "--images", str(tmp_path / "imgs"),
       "--out", out16, "--labels-from-subdirs", "--size", "16", "--no-progress"],
      cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": REPO_ROOT}, capture_output=True,
      text=True, check=False)
  assert proc.returncode == 0, proc.stderr
  assert "wrote 6 records" in proc.stdout
  assert json.load(open(out16 + ".json"))["size"] == 16
  cfg = data.default_data_config()
  cfg.update(source="array_record", path=out16, image_size=16, num_channels=3,
             shuffle=False)
  batch = next(iter(data.make_pipeline(cfg, seed=0, global_batch_size=6, process_index=0,
                                       process_count=1)))
  assert batch["image"].shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1, 1])
  arr0 = originals[items[0][0]][0]
  np.testing.assert_allclose(batch["image"][0], data.to_float(data.center_crop_arr(arr0, 16)))


def test_prep_bad_image_file_raises_or_is_skipped(tmp_path):
  root = tmp_path / "imgs"
  os.makedirs(root)
  for k in range(2):
    Image.fromarray(np.full((6, 6), 10 * k, np.uint8)).save(root / f"ok{k}.png")
  (root / "broken.png").write_bytes(b"definitely not a png")
  out = str(tmp_path / "x.array_record")
  with pytest.raises(ValueError, match=r"broken\.png"):
    prep.prepare_array_record(str(root), out, num_channels=1, progress=False)
  assert not os.path.exists(out) and not os.path.exists(out + ".tmp")
  assert prep.main(["--images", str(root), "--out", out, "--channels", "1",
                    "--no-progress"]) == 1
  summary = prep.prepare_array_record(str(root), out, num_channels=1, skip_bad=True,
                                      progress=False)
  assert summary["num_records"] == 2 and summary["num_skipped"] == 1
  src = data.ArrayRecordSource(out, num_channels=1)
  assert [int(src[i]["image"][0, 0, 0]) for i in range(2)] == [0, 10]
  assert [src[i]["label"] for i in range(2)] == [0, 0]


def _write_records(path, records):
  from array_record.python import array_record_module
  w = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    w.write(r)
  w.close()


def _records_with_bad_ones():
  rng = np.random.default_rng(3)
  good = lambda i: data.encode_record(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), i)
  wrong_shape = bytearray(good(4))
  wrong_shape[9:11] = (9).to_bytes(2, "little")  # Header height 9, PNG is 8 rows.
  recs = [good(0), good(1), b"\x00garbage bytes, not a record\xff" * 3, good(3),
          bytes(wrong_shape), good(5)]
  bad_png = bytearray(good(6))
  bad_png[40:60] = b"\x00" * 20  # Valid header, corrupt PNG payload.
  recs.append(bytes(bad_png))
  recs.append(good(7))
  return recs


def test_corrupt_records_raise_naming_the_record(tmp_path):
  path = tmp_path / "bad.array_record"
  _write_records(path, _records_with_bad_ones())
  src = data.ArrayRecordSource(str(path), num_channels=3)
  assert src[3]["label"] == 3
  with pytest.raises(ValueError, match=r"bad\.array_record record 2: bad magic"):
    src[2]
  with pytest.raises(ValueError, match=r"record 4: decoded image shape \(8, 8, 3\) != header"):
    src[4]
  with pytest.raises(ValueError, match=r"record 6: undecodable image bytes"):
    src[6]
  with pytest.raises(ValueError, match=r"record 0: image has 3 channels, expected 1"):
    data.ArrayRecordSource(str(path), num_channels=1)[0]

  cfg = data.default_data_config()
  cfg.update(source="array_record", path=str(path), image_size=8, num_channels=3,
             shuffle=False)
  it = iter(data.make_pipeline(cfg, seed=0, global_batch_size=2, process_index=0,
                               process_count=1))
  np.testing.assert_array_equal(next(it)["label"], [0, 1])
  with pytest.raises(ValueError, match=r"bad\.array_record record 2"):
    next(it)


def test_corrupt_records_skipped_and_counted(tmp_path):
  path = tmp_path / "bad.array_record"
  _write_records(path, _records_with_bad_ones())
  cfg = data.default_data_config()
  cfg.update(source="array_record", path=str(path), image_size=8, num_channels=3,
             shuffle=False, on_bad_record="skip")
  pipe = data.make_pipeline(cfg, seed=0, global_batch_size=1, process_index=0,
                            process_count=1, num_epochs=1)
  labels = [int(b["label"][0]) for b in pipe]
  assert labels == [0, 1, 3, 5, 7]
  assert pipe.bad_records.count == 3
  assert "record 6" in pipe.bad_records.last_error


def test_multiple_files_name_the_right_file(tmp_path):
  a, b = tmp_path / "a.array_record", tmp_path / "b.array_record"
  img = np.zeros((4, 4, 1), np.uint8)
  _write_records(a, [data.encode_record(img, 0), data.encode_record(img, 1)])
  _write_records(b, [data.encode_record(img, 2), b"junk"])
  src = data.ArrayRecordSource(str(tmp_path / "*.array_record"))
  assert len(src) == 4 and src[2]["label"] == 2
  assert src.locate(3) == (str(b), 1)
  with pytest.raises(ValueError, match=r"b\.array_record record 1 \(global index 3\)"):
    src[3]


# ----------------------------------------------------------------------------
# TFDS via tfds.data_source, without downloads or TensorFlow.
# ----------------------------------------------------------------------------


def test_tfds_data_source_pipeline(tmp_path):
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(9)
  examples = [(rng.integers(0, 256, (10 + k, 12, 3), dtype=np.uint8), k % 3) for k in range(6)]

  class AsymflowTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for k, (arr, label) in enumerate(examples):
        yield k, {"image": Image.fromarray(arr), "label": label}  # PIL: encoded without TF.

  AsymflowTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  assert "tensorflow" not in sys.modules

  cfg = data.default_data_config()
  cfg.update(source="tfds", name="asymflow_tiny_images", split="train", data_dir=str(tmp_path),
             image_size=8, num_channels=3, shuffle=False)
  src = data.make_source(cfg)
  assert isinstance(src, data.TfdsSource) and len(src) == 6
  batch = next(iter(data.make_pipeline(cfg, seed=0, global_batch_size=6, process_index=0,
                                       process_count=1)))
  assert batch["image"].shape == (6, 8, 8, 3) and batch["image"].dtype == np.float32
  # TFDS reorders records at prep time: match each output to its generated example.
  want = {data.to_float(data.center_crop_arr(a, 8)).tobytes(): l for a, l in examples}
  got = {img.tobytes(): int(l) for img, l in zip(batch["image"], batch["label"])}
  assert got == want


def test_tfds_source_bad_record_names_index():
  good = io.BytesIO()
  Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(good, format="PNG")
  fake = [{"image": good.getvalue(), "label": 1}, {"image": b"not an image", "label": 2}]
  src = data.TfdsSource("fake_ds", split="test", data_source=fake)
  assert src[0]["label"] == 1 and src[0]["image"].shape == (5, 5, 3)
  with pytest.raises(ValueError, match=r"'fake_ds' split 'test' record 1: undecodable"):
    src[1]


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'no_such_dataset_xyz' split 'train'.*Nothing is"):
    data.TfdsSource("no_such_dataset_xyz", split="train", data_dir=str(tmp_path))


def test_worker_processes_checkpoint_restore():
  cfg = data.default_data_config()
  cfg.num_workers, cfg.random_flip = 2, True
  make = lambda: iter(data.make_pipeline(cfg, seed=4, global_batch_size=16, process_index=0,
                                         process_count=1))
  it = make()
  try:
    for _ in range(3):
      next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
  finally:
    it.close()
  restored = make()
  try:
    restored.set_state(state)
    for want in expected:
      got = next(restored)
      assert got["image"].shape == (16, 32, 32, 1)
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
  finally:
    restored.close()
