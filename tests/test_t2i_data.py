"""Tests for the text-to-image dataset format (asymflow_jax.data.t2i / t2i_prep). CPU only, offline,
a deterministic fake numpy encoder (no torch, no weights)."""

import json
import os
import shutil
import zlib

import ml_collections
import ml_dtypes
import numpy as np
import pytest
from PIL import Image

from asymflow_jax import data
from asymflow_jax.data import pipeline, sources, t2i, t2i_prep

RES = (32, 48)                 # H, W: non-square on purpose
LAT_C, SEQ, DIM = 128, 8, 12   # latent channels, prompt length L, embedding width D
N = 12
SIZES = [(32, 48), (40, 70), (64, 64), (50, 30)]   # (H, W) of the source PNGs


def fake_encode(images, captions):
  """Deterministic stand-in for the FLUX.2 klein encoders: per-image 16x16 pooling projected to 128
  channels (not float16-exact), per-caption hashed embeddings (not bfloat16-exact, with values
  beyond the float16 range), num_tokens = words + 2 (capped at L)."""
  x = np.asarray(images, np.float32) / 255.0
  b, h, w, _ = x.shape
  pooled = x.reshape(b, h // 16, 16, w // 16, 16, 3).mean(axis=(2, 4))
  proj = np.random.default_rng(0).normal(size=(3, LAT_C)).astype(np.float32)
  latents = pooled @ proj + np.float32(1 / 3)
  embeds = np.stack([np.random.default_rng(zlib.crc32(c.encode())).normal(size=(SEQ, DIM)).astype(np.float32)
                     * np.float32(3.3) for c in captions])
  embeds[:, 0, 0] = 1e6   # an outlier, as Qwen3 hidden states have
  tokens = np.array([min(len(c.split()) + 2, SEQ) for c in captions], np.int32)
  return latents, embeds, tokens


def make_folder(root, n=N):
  """n random PNGs of assorted sizes with same-stem captions (the last two in a sub-folder)."""
  rng = np.random.default_rng(1)
  os.makedirs(root / "sub", exist_ok=True)
  for i in range(n):
    folder = root / "sub" if i >= n - 2 else root
    h, w = SIZES[i % len(SIZES)]
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(folder / f"img_{i:02d}.png")
    (folder / f"img_{i:02d}.txt").write_text(f"  a photo number {i} " + "word " * (i % 4) + "\n", encoding="utf-8")
  return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """(dataset folder, [(image path, caption path)]) of N records in shards of 5 (5, 5, 2)."""
  root = tmp_path_factory.mktemp("t2i")
  images = make_folder(root / "images")
  out = root / "ds"
  t2i_prep.prepare_t2i_dataset(str(images), str(out), resolution=RES, encode_fn=fake_encode,
                               encoder_info={"name": "fake"}, batch_size=5, records_per_shard=5, progress=False)
  return out, t2i_prep.list_pairs(str(images))


def expected(pairs):
  images = np.stack([t2i_prep.load_image(p, RES) for p, _ in pairs])
  captions = [t2i_prep.read_caption(c) for _, c in pairs]
  latents, embeds, tokens = fake_encode(images, captions)
  return images, captions, latents, embeds, tokens


def bits(x):
  return np.asarray(x).view(np.uint16)


def lookup_index(batch_images, images):
  table = {im.tobytes(): i for i, im in enumerate(images)}
  raw = np.round((np.asarray(batch_images) + 1.0) * 127.5).astype(np.uint8)
  return [table[r.tobytes()] for r in raw]


def copy_dataset(src, dst):
  shutil.copytree(src, dst)
  return dst


def edit_meta(folder, fn):
  path = folder / t2i.META_FILE
  meta = json.loads(path.read_text())
  fn(meta)
  path.write_text(json.dumps(meta))


# ----------------------------------------------------------------------------
# Format round trip.
# ----------------------------------------------------------------------------


def test_round_trip_exact(dataset):
  path, pairs = dataset
  images, captions, latents, embeds, tokens = expected(pairs)
  src = t2i.T2ISource(path)
  assert len(src) == N and src.resolution == RES
  assert src.latents_shape == (2, 3, LAT_C) and src.prompt_embeds_shape == (SEQ, DIM)
  assert [os.path.basename(p) for p in src.paths] == ["data-00000.array_record", "data-00001.array_record",
                                                      "data-00002.array_record"]
  assert src.locate(7) == (src.paths[1], 2)
  for i in range(N):
    ex = src[i]
    assert sorted(ex) == ["caption", "image", "latents", "num_tokens", "prompt_embeds"]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 48, 3)
    np.testing.assert_array_equal(ex["image"], images[i])
    assert ex["latents"].dtype == np.float16
    np.testing.assert_array_equal(ex["latents"], latents[i].astype(np.float16))
    assert ex["prompt_embeds"].dtype == ml_dtypes.bfloat16 and ex["prompt_embeds"].shape == (SEQ, DIM)
    np.testing.assert_array_equal(bits(ex["prompt_embeds"]), bits(embeds[i].astype(ml_dtypes.bfloat16)))
    assert ex["caption"] == captions[i] and ex["num_tokens"] == tokens[i]
  assert src[0]["caption"] == "a photo number 0"
  assert src[N - 1]["caption"].startswith("a photo number 11")   # from the sub-folder
  assert float(src[3]["prompt_embeds"][0, 0]) == float(ml_dtypes.bfloat16(1e6))   # beyond float16, kept
  # Cropped/resized once at prep time: the exact-size image is stored unchanged.
  with Image.open(pairs[0][0]) as img:
    np.testing.assert_array_equal(src[0]["image"], np.asarray(img))
  _, empty_embeds, empty_tokens = fake_encode(images[:1], [""])
  np.testing.assert_array_equal(bits(src.empty_prompt_embeds), bits(empty_embeds[0].astype(ml_dtypes.bfloat16)))
  assert src.empty_num_tokens == empty_tokens[0] == 2
  meta = t2i.read_meta(path)
  assert meta["arrays"] == {"image": {"shape": [32, 48, 3], "dtype": "uint8"},
                            "latents": {"shape": [2, 3, LAT_C], "dtype": "float16"},
                            "prompt_embeds": {"shape": [SEQ, DIM], "dtype": "bfloat16"}}
  assert meta["encoder"] == {"name": "fake"} and meta["num_skipped"] == 0
  assert [s["num_records"] for s in meta["shards"]] == [5, 5, 2]
  assert "T2ISource(" in repr(src) and "12 records" in repr(src)


def test_bfloat16_rounding_matches_ml_dtypes():
  rng = np.random.default_rng(0)
  scales = np.float32(10.0) ** rng.integers(-30, 30, size=1000).astype(np.float32)
  x = np.concatenate([rng.normal(size=1000).astype(np.float32) * scales,
                      np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, 1e-40, np.inf, -np.inf],
                               np.float32)])
  np.testing.assert_array_equal(t2i.float32_to_bfloat16_bits(x), bits(x.astype(ml_dtypes.bfloat16)))
  assert np.isnan(t2i.bfloat16_bits_to_float32(t2i.float32_to_bfloat16_bits(np.float32([np.nan])))).all()
  y = x[np.isfinite(x)]
  np.testing.assert_array_equal(t2i.bfloat16_bits_to_float32(t2i.float32_to_bfloat16_bits(y)),
                                y.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_record_encoding_bfloat16_latents_and_errors():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(16, 32, 3), dtype=np.uint8)
  lat = rng.normal(size=(1, 2, 4)).astype(np.float32)
  emb = rng.normal(size=(3, 5)).astype(np.float32)
  rec = t2i.encode_record(image, lat, emb, "héllo", num_tokens=2, latents_dtype="bfloat16")
  ex = t2i.decode_record(rec)
  assert ex["latents"].dtype == ml_dtypes.bfloat16 and ex["caption"] == "héllo" and ex["num_tokens"] == 2
  np.testing.assert_array_equal(bits(ex["latents"]), bits(lat.astype(ml_dtypes.bfloat16)))
  # Already-bfloat16 inputs are stored bit for bit.
  ex2 = t2i.decode_record(t2i.encode_record(image, lat, emb.astype(ml_dtypes.bfloat16), ""))
  np.testing.assert_array_equal(bits(ex2["prompt_embeds"]), bits(emb.astype(ml_dtypes.bfloat16)))
  with pytest.raises(ValueError, match="bad magic"):
    t2i.decode_record(b"XXXX" + rec[4:])
  with pytest.raises(ValueError, match="truncated"):
    t2i.decode_record(rec[:200])
  with pytest.raises(ValueError, match="shorter than"):
    t2i.decode_record(rec[:5])
  with pytest.raises(ValueError, match="record version 9"):
    t2i.decode_record(rec[:4] + bytes([9]) + rec[5:])
  with pytest.raises(ValueError, match="bytes after the arrays"):
    t2i.decode_record(rec + b"x")
  big = lat.copy()
  big[0, 1, 2] = 1e5   # beyond the float16 range
  with pytest.raises(ValueError, match=r"latents: 1 value\(s\) are not finite after the cast to float16"):
    t2i.encode_record(image, big, emb, "")
  with pytest.raises(ValueError, match=r"image: float32\[16, 32, 3\]; expected uint8 \[H, W, 3\]"):
    t2i.encode_record(image.astype(np.float32), lat, emb, "")
  with pytest.raises(ValueError, match="num_tokens=4"):
    t2i.encode_record(image, lat, emb, "", num_tokens=4)
  with pytest.raises(ValueError, match="latents_dtype='float32'"):
    t2i.encode_record(image, lat, emb, "", latents_dtype="float32")


def test_writer_errors(tmp_path):
  with pytest.raises(ValueError, match=r"resolution=\(30, 48\): expected \(H, W\) positive multiples of 16"):
    t2i.T2IWriter(tmp_path / "a", (30, 48))
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(16, 32, 3), dtype=np.uint8)
  with t2i.T2IWriter(tmp_path / "b", (16, 32)) as w:
    w.write(image, np.zeros((1, 2, 4)), np.zeros((3, 5)), "x")
    with pytest.raises(ValueError, match=r"image shape \[16, 16, 3\]; expected \[16, 32, 3\]"):
      w.write(image[:, :16], np.zeros((1, 2, 4)), np.zeros((3, 5)), "x")
    with pytest.raises(ValueError, match=r"latents shape \[2, 2, 4\]; expected \[1, 2, C\]"):
      w.write(image, np.zeros((2, 2, 4)), np.zeros((3, 5)), "x")
    with pytest.raises(ValueError, match=r"prompt_embeds shape \[4, 5\] differs from the first record's \[3, 5\]"):
      w.write(image, np.zeros((1, 2, 4)), np.zeros((4, 5)), "x")
    with pytest.raises(ValueError, match=r"empty_prompt_embeds shape \[3, 6\]; expected \[3, 5\]"):
      w.finish(np.zeros((3, 6)))
  assert not [f for f in os.listdir(tmp_path / "b") if f.endswith((".array_record", ".tmp", ".json"))]
  with t2i.T2IWriter(tmp_path / "c", (16, 32)) as w:
    w.write(image, np.zeros((1, 2, 4)), np.zeros((3, 5)), "x")
    w.finish(np.zeros((3, 5)))
  with pytest.raises(FileExistsError, match="already holds a t2i dataset"):
    t2i.T2IWriter(tmp_path / "c", (16, 32))
  t2i.T2IWriter(tmp_path / "c", (16, 32), overwrite=True).abort()
  assert not os.listdir(tmp_path / "c")
  with pytest.raises(RuntimeError):   # an exception inside the block removes the partial shard
    with t2i.T2IWriter(tmp_path / "d", (16, 32)) as w:
      w.write(image, np.zeros((1, 2, 4)), np.zeros((3, 5)), "x")
      raise RuntimeError("interrupted")
  assert not os.listdir(tmp_path / "d")


def test_latents_to_grid_inverts_channel_first_patchify():
  from asymflow_jax import asymflow  # pylint: disable=g-import-not-at-top
  z = np.random.default_rng(0).normal(size=(2, 3, 4, 128)).astype(np.float32)
  grid = t2i.latents_to_grid(z)
  assert grid.shape == (2, 6, 8, 32)
  tokens = np.asarray(asymflow.patchify(grid, 2, channel_first=True))
  np.testing.assert_array_equal(tokens, z.reshape(2, 12, 128))
  # diffusers' _patchify_latents: channel index c * 4 + py * 2 + px.
  assert grid[0, 1, 0, 5] == z[0, 0, 0, 5 * 4 + 1 * 2 + 0]


# ----------------------------------------------------------------------------
# meta.json / shard validation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("field,value,match", [
    ("format", "other", r"format='other'; expected 'asymflow_t2i'"),
    ("version", 2, r"version=2; expected <= 1: written by a newer asymflow_jax"),
    ("resolution", [32, 40], r"resolution=\[32, 40\]; expected multiples of latent_downsample=16"),
    ("num_records", 13, r"num_records=13; expected 12 \(the sum over the shards\)"),
    ("arrays.latents.dtype", "float32", r"arrays.latents.dtype='float32'; expected one of \('float16', 'bfloat16'\)"),
    ("arrays.latents.shape", [4, 3, 128], r"arrays.latents.shape=\[4, 3, 128\]; expected \[2, 3, C\]"),
    ("arrays.image.shape", [32, 48, 1], r"arrays.image.shape=\[32, 48, 1\]; expected \[32, 48, 3\]"),
    ("shards", [], r"shards=\[\]; expected a non-empty list"),
])
def test_meta_validation_errors(dataset, tmp_path, field, value, match):
  folder = copy_dataset(dataset[0], tmp_path / "ds")

  def set_field(meta):
    *parents, last = field.split(".")
    node = meta
    for p in parents:
      node = node[p]
    node[last] = value
  edit_meta(folder, set_field)
  with pytest.raises(ValueError, match=match) as e:
    t2i.T2ISource(folder)
  assert "meta.json" in str(e.value)


def test_dataset_file_errors(dataset, tmp_path):
  folder = copy_dataset(dataset[0], tmp_path / "ds")
  os.remove(folder / t2i.META_FILE)
  with pytest.raises(FileNotFoundError, match="meta.json not found .*the prep run did not finish"):
    t2i.T2ISource(folder)
  folder = copy_dataset(dataset[0], tmp_path / "ds2")

  def claim_one_more(meta):
    meta["shards"][2]["num_records"] = 3
    meta["num_records"] = N + 1
  edit_meta(folder, claim_one_more)
  with pytest.raises(ValueError, match=r"data-00002.array_record holds 2 records; .*meta.json says 3"):
    t2i.T2ISource(folder)
  folder = copy_dataset(dataset[0], tmp_path / "ds3")
  os.remove(folder / "data-00001.array_record")
  with pytest.raises(FileNotFoundError, match="lists shard.* that do not exist: .*data-00001"):
    t2i.T2ISource(folder)
  folder = copy_dataset(dataset[0], tmp_path / "ds4")
  np.save(folder / t2i.EMPTY_PROMPT_FILE, np.zeros((SEQ, DIM + 1), np.float32))
  with pytest.raises(ValueError, match=r"empty_prompt.npy: float32\[8, 13\]; expected float32\[8, 12\]"):
    t2i.T2ISource(folder)
  np.save(folder / t2i.EMPTY_PROMPT_FILE, np.full((SEQ, DIM), 0.1, np.float32))
  with pytest.raises(ValueError, match="not bfloat16-exact"):
    t2i.T2ISource(folder)
  # Records that do not match meta.json: BadRecordError naming the shard and the index.
  folder = copy_dataset(dataset[0], tmp_path / "ds5")
  edit_meta(folder, lambda m: m["arrays"]["prompt_embeds"].update(shape=[SEQ, DIM + 1]))
  np.save(folder / t2i.EMPTY_PROMPT_FILE, np.zeros((SEQ, DIM + 1), np.float32))
  src = t2i.T2ISource(folder)
  with pytest.raises(sources.BadRecordError,
                     match=r"data-00001.array_record record 1 \(global index 6\): prompt_embeds is "
                           r"bfloat16\[8, 12\]; meta.json says bfloat16\[8, 13\]"):
    src[6]
  with pytest.raises(IndexError, match=r"record index 12 out of range \[0, 12\)"):
    src[N]


def test_corrupt_record_raises_or_is_skipped(dataset, tmp_path):
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  folder = copy_dataset(dataset[0], tmp_path / "ds")
  w = array_record_module.ArrayRecordWriter(str(folder / "data-00003.array_record"), "group_size:1")
  w.write(b"AFT2 not really a record")
  w.close()

  def add_shard(meta):
    meta["shards"].append({"file": "data-00003.array_record", "num_records": 1})
    meta["num_records"] = N + 1
  edit_meta(folder, add_shard)
  src = t2i.T2ISource(folder)
  with pytest.raises(sources.BadRecordError, match=r"data-00003.array_record record 0 \(global index 12\): "):
    src[N]
  cfg = pipeline.t2i_data_config(str(folder), shuffle=False, on_bad_record="skip")
  pipe = data.make_pipeline(cfg, seed=0, global_batch_size=1, process_index=0, process_count=1, num_epochs=1)
  assert len(list(pipe)) == N and pipe.bad_records.count == 1
  assert "global index 12" in pipe.bad_records.last_error


# ----------------------------------------------------------------------------
# The grain pipeline.
# ----------------------------------------------------------------------------


def test_pipeline_batches(dataset):
  path, pairs = dataset
  images, _, latents, embeds, tokens = expected(pairs)
  cfg = pipeline.t2i_data_config(str(path), shuffle=False)
  assert cfg.source in pipeline.SOURCES
  pipe = data.make_pipeline(cfg, seed=0, global_batch_size=4, process_index=0, process_count=1)
  assert isinstance(pipe.source, t2i.T2ISource) and pipe.steps_per_epoch == 3
  batch = next(iter(pipe))
  assert sorted(batch) == sorted(t2i.BATCH_KEYS)
  assert batch["image"].shape == (4, 32, 48, 3) and batch["image"].dtype == np.float32
  assert batch["latents"].shape == (4, 2, 3, LAT_C) and batch["latents"].dtype == np.float32
  assert batch["prompt_embeds"].shape == (4, SEQ, DIM) and batch["prompt_embeds"].dtype == ml_dtypes.bfloat16
  assert batch["num_tokens"].shape == (4,) and batch["num_tokens"].dtype == np.int32
  np.testing.assert_array_equal(batch["image"], data.to_float(images[:4]))
  np.testing.assert_array_equal(batch["latents"], latents[:4].astype(np.float16).astype(np.float32))
  np.testing.assert_array_equal(bits(batch["prompt_embeds"]), bits(embeds[:4].astype(ml_dtypes.bfloat16)))
  np.testing.assert_array_equal(batch["num_tokens"], tokens[:4])
  # The VR objective's latent key may be named in extra_keys (it is always carried).
  data.make_pipeline(pipeline.t2i_data_config(str(path), extra_keys=("latents",)), seed=0, global_batch_size=4,
                     process_index=0, process_count=1)


@pytest.mark.parametrize("overrides,match", [
    (dict(random_flip=True), "random_flip=True with source='t2i'"),
    (dict(num_channels=1), "num_channels=1 with source='t2i': expected 3"),
    (dict(extra_keys=("latent",)), r"extra_keys=\('latent',\) with source='t2i'"),
    (dict(path=""), "config.path .* is required for source='t2i'"),
])
def test_pipeline_config_errors(dataset, overrides, match):
  cfg = pipeline.t2i_data_config(str(dataset[0]))
  cfg.update(overrides)
  with pytest.raises(ValueError, match=match):
    data.make_pipeline(cfg, seed=0, global_batch_size=4, process_index=0, process_count=1)


def test_two_processes_cover_all_records_without_overlap(dataset):
  path, pairs = dataset
  images = expected(pairs)[0]
  seen = []
  for pi in range(2):
    pipe = data.make_pipeline(pipeline.t2i_data_config(str(path)), seed=5, global_batch_size=4, process_index=pi,
                              process_count=2, num_epochs=1)
    assert pipe.local_batch_size == 2 and pipe.examples_per_process == N // 2
    batches = list(pipe)
    assert len(batches) == 3 and all(b["image"].shape[0] == 2 for b in batches)
    ids = [i for b in batches for i in lookup_index(b["image"], images)]
    assert sorted(ids) == list(range(pi, N, 2))   # strided per-process shard
    seen += ids
  assert sorted(seen) == list(range(N))


def test_iterator_checkpoint_restore(dataset):
  path = str(dataset[0])
  make = lambda: iter(data.make_pipeline(pipeline.t2i_data_config(path, num_threads=2, prefetch=4), seed=3,
                                         global_batch_size=4, process_index=1, process_count=2))
  it = make()
  for _ in range(4):   # into the second epoch (6 records per process: 3 batches of 2 per epoch)
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  restored = make()
  restored.set_state(state)
  got = [next(restored) for _ in range(3)]
  for a, b in zip(want, got):
    assert sorted(a) == sorted(b)
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]).view(np.uint8), np.asarray(b[k]).view(np.uint8))
  assert not np.array_equal(want[0]["image"], want[1]["image"])


# ----------------------------------------------------------------------------
# Prep CLI.
# ----------------------------------------------------------------------------


def test_crop_and_resize():
  img = np.zeros((32, 144, 3), np.uint8)    # three 48-wide bands: red | green | blue
  img[:, :48, 0] = img[:, 48:96, 1] = img[:, 96:, 2] = 255
  assert t2i_prep.crop_box(144, 32, RES) == (48.0, 0.0, 96.0, 32.0)
  out = np.asarray(Image.fromarray(img).resize((48, 32), Image.Resampling.LANCZOS, box=(48.0, 0.0, 96.0, 32.0)))
  np.testing.assert_array_equal(out[:, 4:-4], np.broadcast_to(np.uint8([0, 255, 0]), (32, 40, 3)))
  assert t2i_prep.crop_box(100, 100, (32, 48)) == pytest.approx((0.0, 100 / 6, 100.0, 100 - 100 / 6))
  assert t2i_prep.parse_resolution("1024,768") == (1024, 768) and t2i_prep.parse_resolution("64") == (64, 64)
  with pytest.raises(ValueError, match="resolution='a,b': expected 'H,W'"):
    t2i_prep.parse_resolution("a,b")


def test_prep_bad_inputs(tmp_path):
  folder = make_folder(tmp_path / "images", n=4)
  os.remove(folder / "img_01.txt")
  (folder / "img_00.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match=r"cannot read image .*img_00.png.*--skip_bad"):
    t2i_prep.prepare_t2i_dataset(str(folder), str(tmp_path / "out"), resolution=RES, encode_fn=fake_encode,
                                 progress=False)
  assert not os.path.exists(tmp_path / "out" / t2i.META_FILE)
  meta = t2i_prep.prepare_t2i_dataset(str(folder), str(tmp_path / "out"), resolution=RES, encode_fn=fake_encode,
                                      skip_bad=True, batch_size=2, progress=False)
  assert meta["num_records"] == 2 and meta["num_skipped"] == 2
  assert "cannot read image" in " ".join(meta["skipped"]) and "img_01.txt not found" in " ".join(meta["skipped"])
  assert [r["caption"] for r in map(t2i.T2ISource(tmp_path / "out").__getitem__, range(2))] == [
      "a photo number 2 word word", "a photo number 3 word word word"]
  with pytest.raises(ValueError, match=r"encode_fn latents shape \[2, 1, 3, 128\]; expected \[2, 2, 3, C\]"):
    t2i_prep.prepare_t2i_dataset(str(folder), str(tmp_path / "out2"), resolution=RES, skip_bad=True,
                                 encode_fn=lambda im, c: (fake_encode(im, c)[0][:, :1], fake_encode(im, c)[1]),
                                 progress=False)


def test_prep_cli_main(dataset, tmp_path, capsys):
  images = os.path.dirname(dataset[1][0][0])
  out = tmp_path / "cli"
  argv = [f"--images={images}", f"--out={out}", "--resolution=32,48", "--no_progress",
          "--encode_fn=tests.test_t2i_data:fake_encode", "--latents_dtype=bfloat16"]
  assert t2i_prep.main(argv) == 0
  assert "wrote 12 records in 1 shard(s)" in capsys.readouterr().out
  src = t2i.T2ISource(out)
  assert src.meta["encoder"] == {"name": "tests.test_t2i_data:fake_encode"}
  ref = t2i.T2ISource(dataset[0])[5]
  ex = src[5]
  assert ex["latents"].dtype == ml_dtypes.bfloat16 and ex["caption"] == ref["caption"]
  np.testing.assert_array_equal(ex["image"], ref["image"])
  assert t2i_prep.main(argv) == 1 and "already holds a t2i dataset" in capsys.readouterr().err
  assert t2i_prep.main(argv[:-2] + ["--overwrite", "--encode_fn=tests.test_t2i_data:fake_encode"]) == 0
  assert t2i_prep.main(argv[:4]) == 1
  assert "exactly one of --encoder_path" in capsys.readouterr().err
  assert t2i_prep.main(argv[:4] + [f"--encoder_path={tmp_path}/nope"]) == 1
  err = capsys.readouterr().err
  assert "nope" in err or "torch" in err   # no weights (or no torch) here: a clear error either way


def test_t2i_config_is_a_data_config():
  cfg = pipeline.t2i_data_config("/some/folder")
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert sorted(cfg.keys()) == sorted(data.default_data_config().keys())
  assert (cfg.source, cfg.num_channels, cfg.random_flip) == ("t2i", 3, False)
