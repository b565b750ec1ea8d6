"""grain input pipeline: shard -> shuffle -> repeat -> decode/crop/flip -> batch.

Built with grain's ``MapDataset`` API (random access, so shuffling, sharding
and iterator checkpoints are all index arithmetic)::

    MapDataset.range(num_records)          # record indices of the source
      [: per_process * process_count]      # equal shards on every process
      [process_index :: process_count]     # strided, disjoint per-process shard
      .shuffle(seed)                       # new permutation every epoch (grain
      .repeat(num_epochs)                  #   folds the epoch into the seed)
      .map_with_index(load)                # read + validate + ADM crop + flip
      .to_iter_dataset(ReadOptions)        # thread prefetch; bad records -> None
      .filter(not None).batch(drop_remainder=True)
      .mp_prefetch(num_workers)            # optional worker processes

The iterator returned by :meth:`Pipeline.__iter__` is a grain
``DatasetIterator``: ``it.get_state()`` is a small JSON-able dict and
``it.set_state(state)`` restores it so the next batches are identical.

Batches are ``{"image": float32[B, H, W, C] in [-1, 1], "label": int32[B]}``
with ``B = global_batch_size // process_count``, plus one float32 ``[B, ...]``
entry per name in ``config.extra_keys`` (e.g. ``"latent"`` from an ``npz``
source of cached latents), carried through unchanged. uint8 images are
centre-cropped and scaled to [-1, 1]; float32 images (``npz`` sources) are
already in model units and must be exactly ``[image_size, image_size,
num_channels]`` (no crop). Label dropout for classifier-free guidance is not
done here (the train step does it).

``source='t2i'`` (text-to-image finetuning, :mod:`asymflow_jax.data.t2i`) serves a dataset folder at its
own fixed resolution (no crop, no flip; ``image_size`` is not used) with batches
``{"image": float32[B, H, W, 3], "latents": float32[B, h, w, C], "prompt_embeds": bfloat16[B, L, D],
"num_tokens": int32[B]}`` (no "label").
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import grain
import ml_collections
import numpy as np

from asymflow_jax.data import sources
from asymflow_jax.data import t2i

ON_BAD_RECORD = ("raise", "skip")
IMAGE_SOURCES = ("mnist", "tfds", "array_record", "npz")   # image (+ label) datasets
SOURCES = IMAGE_SOURCES + ("t2i",)                          # + text-to-image datasets (data/t2i.py)


# ----------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------


def default_data_config() -> ml_collections.ConfigDict:
  """The embedded offline default: 5000 MNIST digits, 32x32x1, 10 classes."""
  c = ml_collections.ConfigDict()
  c.source = "mnist"          # 'mnist' | 'tfds' | 'array_record' | 'npz' | 't2i'
  c.name = ""                 # TFDS dataset name, e.g. 'imagenet2012'
  c.split = "train"           # TFDS split
  c.data_dir = ""             # TFDS data_dir ('' = TFDS default)
  c.path = ""                 # ArrayRecord file / glob / comma list, the .npz file, or the t2i dataset folder
  c.image_key = "image"       # TFDS feature names
  c.label_key = "label"
  c.image_size = 32
  c.num_channels = 1
  c.num_classes = 10          # informational, for the model config
  c.shuffle = True
  c.random_flip = False       # mirrored digits are not digits
  c.extra_keys = ()           # extra float arrays carried to the batch (npz), e.g. ('latent',)
  c.on_bad_record = "raise"   # 'raise' | 'skip' (skipped records are counted)
  c.num_threads = 0           # grain ReadOptions.num_threads (0 = in-line)
  c.prefetch = 0              # grain ReadOptions.prefetch_buffer_size
  c.num_workers = 0           # grain mp_prefetch worker processes (0 = none)
  c.worker_buffer_size = 2    # batches buffered per worker process
  return c


def tfds_data_config(name: str = "imagenet2012", *, image_size: int = 64,
                     data_dir: str = "", num_classes: int = 1000
                     ) -> ml_collections.ConfigDict:
  """A TFDS (e.g. ImageNet) config with ADM preprocessing and random flips."""
  c = default_data_config()
  c.source, c.name, c.data_dir = "tfds", name, data_dir
  c.image_size, c.num_channels, c.num_classes = image_size, 3, num_classes
  c.random_flip = True
  c.num_threads, c.prefetch = 16, 256
  return c


def t2i_data_config(path: str, **overrides) -> ml_collections.ConfigDict:
  """A text-to-image dataset folder (``python -m asymflow_jax.data.t2i_prep``): RGB, no flips."""
  c = default_data_config()
  c.source, c.path, c.num_channels, c.random_flip = "t2i", str(path), 3, False
  c.update(overrides)
  return c


def make_source(config: ml_collections.ConfigDict):
  """Builds the random-access source described by ``config.source``."""
  kind = config.source
  if kind == "mnist":
    pad_to = config.image_size if config.image_size >= sources.MNIST_IMAGE_SIZE else None
    return sources.MnistSource(pad_to=pad_to, num_channels=config.num_channels)
  if kind == "tfds":
    if not config.name:
      raise ValueError("config.name (the TFDS dataset name) is required for source='tfds'")
    return sources.TfdsSource(
        config.name, split=config.split, data_dir=config.data_dir or None,
        image_key=config.image_key, label_key=config.label_key,
        num_channels=config.num_channels)
  if kind == "array_record":
    if not config.path:
      raise ValueError("config.path is required for source='array_record'")
    return sources.ArrayRecordSource(config.path, num_channels=config.num_channels)
  if kind == "npz":
    if not config.path:
      raise ValueError("config.path (the .npz file) is required for source='npz'")
    return sources.NpzSource(config.path, keys=sources.NPZ_REQUIRED_KEYS + extra_keys_of(config))
  if kind == "t2i":
    if not config.path:
      raise ValueError("config.path (the t2i dataset folder) is required for source='t2i'")
    return t2i.T2ISource(config.path)
  raise ValueError(f"unknown data source {kind!r}; expected one of {IMAGE_SOURCES} (image datasets) or 't2i' "
                   "(text-to-image datasets)")


def extra_keys_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``config.extra_keys`` validated: unique non-empty names other than 'image' / 'label'."""
  keys = config.get("extra_keys", ())
  if isinstance(keys, str) or not isinstance(keys, (tuple, list)):
    raise ValueError(f"config.extra_keys={keys!r}: expected a tuple of array names, e.g. ('latent',)")
  keys = tuple(keys)
  bad = [k for k in keys if not isinstance(k, str) or not k or k in sources.NPZ_REQUIRED_KEYS]
  if bad or len(set(keys)) != len(keys):
    raise ValueError(f"config.extra_keys={keys!r}: expected unique names other than "
                     f"{list(sources.NPZ_REQUIRED_KEYS)}")
  return keys


# ----------------------------------------------------------------------------
# Per-record processing.
# ----------------------------------------------------------------------------


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1] (pixel / 127.5 - 1)."""
  return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def flip_decision(seed: int, epoch: int, record_index: int) -> bool:
  """Deterministic fair coin for one record in one epoch (independent of sharding)."""
  rng = np.random.default_rng([seed & 0xFFFFFFFF, 0xF11B, epoch, record_index])
  return bool(rng.random() < 0.5)


class BadRecordCounter:
  """Thread-safe count of skipped records (``on_bad_record='skip'``).

  Counts the records skipped by this Python process; with ``num_workers > 0``
  the skipping happens in the worker processes and is not reflected here.
  """

  def __init__(self):
    self._lock = threading.Lock()
    self.count = 0
    self.last_error: str | None = None

  def add(self, err: Exception) -> None:
    with self._lock:
      self.count += 1
      self.last_error = str(err)


@dataclasses.dataclass
class _LoadFn:
  """Picklable (for worker processes) per-record transform.

  uint8 images: centre crop + scale to [-1, 1]. float32 images: passed through (already in model
  units), shape must be ``(image_size, image_size, num_channels)``. ``extra_keys``: arrays of the
  record passed through as float32.
  """
  source: Any
  shard_size: int
  image_size: int
  num_channels: int
  random_flip: bool
  seed: int
  on_bad_record: str
  counter: BadRecordCounter | None
  extra_keys: tuple[str, ...] = ()

  def _image(self, record_index: int, image: np.ndarray) -> np.ndarray:
    """Record image -> float32 [image_size, image_size, C]; BadRecordError naming the record."""
    if image.ndim == 2:
      image = image[:, :, None]
    if image.dtype == np.float32:
      want = (self.image_size, self.image_size, self.num_channels)
      if image.shape != want:
        raise sources.BadRecordError(
            f"{self.source!r} record {record_index}: float32 image shape {list(image.shape)} != "
            f"{list(want)} (image_size, image_size, num_channels); float images are not cropped")
      return image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != self.num_channels:
      raise sources.BadRecordError(
          f"{self.source!r} record {record_index}: image {image.dtype}{list(image.shape)}"
          f" is not uint8 [H, W, {self.num_channels}] (or float32 "
          f"[{self.image_size}, {self.image_size}, {self.num_channels}])")
    return to_float(sources.center_crop_arr(image, self.image_size))

  def __call__(self, position: int, record_index: int):
    record_index = int(record_index)
    try:
      ex = self.source[record_index]
      image = self._image(record_index, np.asarray(ex["image"]))
      extras = {}
      for key in self.extra_keys:
        if key not in ex:
          raise sources.BadRecordError(f"{self.source!r} record {record_index}: has no extra array {key!r}")
        try:
          extras[key] = np.asarray(ex[key], dtype=np.float32)
        except (TypeError, ValueError) as e:
          raise sources.BadRecordError(
              f"{self.source!r} record {record_index}: extra array {key!r} is not numeric: {e}") from e
    except sources.BadRecordError as e:
      if self.on_bad_record == "skip":
        if self.counter is not None:
          self.counter.add(e)
        return None
      raise
    if self.random_flip:
      epoch = position // self.shard_size
      if flip_decision(self.seed, epoch, record_index):
        image = image[:, ::-1]
    return {"image": image, "label": np.int32(ex["label"]), **extras}

  def __getstate__(self):  # The lock in the counter cannot be pickled.
    state = dict(self.__dict__)
    state["counter"] = None
    return state


# ----------------------------------------------------------------------------
# Pipeline.
# ----------------------------------------------------------------------------


def _grain_seed(seed: int) -> int:
  # Hash the user seed so that grain's per-epoch folding (seed + epoch) does
  # not make (seed s, epoch 1) equal to (seed s + 1, epoch 0).
  return int(np.random.SeedSequence([seed & 0xFFFFFFFF, 0x5EED]).generate_state(1)[0])


@dataclasses.dataclass
class Pipeline:
  """A configured input pipeline; iterate it to get a checkpointable iterator."""
  dataset: grain.IterDataset
  source: Any
  config: ml_collections.ConfigDict
  local_batch_size: int
  examples_per_process: int
  bad_records: BadRecordCounter

  @property
  def steps_per_epoch(self) -> int:
    return self.examples_per_process // self.local_batch_size

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)


def make_pipeline(config: ml_collections.ConfigDict | None = None, *, seed: int,
                  global_batch_size: int, process_index: int | None = None,
                  process_count: int | None = None, num_epochs: int | None = None,
                  source=None) -> Pipeline:
  """Builds the training input pipeline for this process.

  Args:
    config: data config (see :func:`default_data_config`); None = the default.
    seed: explicit seed for shuffling and flips (same on every process).
    global_batch_size: batch size over all processes; must be divisible by
      ``process_count``.
    process_index, process_count: this process and the number of processes
      (default: ``jax.process_index()`` / ``jax.process_count()``).
    num_epochs: number of passes over the data; None repeats forever.
    source: optional pre-built source overriding ``config.source``.
  """
  config = default_data_config() if config is None else config
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"invalid process_index={process_index} / process_count={process_count}")
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by "
        f"process_count={process_count}")
  if config.on_bad_record not in ON_BAD_RECORD:
    raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {config.on_bad_record!r}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  is_t2i = config.source == "t2i" or isinstance(source, t2i.T2ISource)
  if is_t2i:
    t2i.check_pipeline_config(config)
  extras = extra_keys_of(config)
  if extras and config.random_flip:
    raise ValueError(f"config.random_flip=True with config.extra_keys={extras!r}: a flipped image would not "
                     "match its extra arrays (e.g. its cached latent); set random_flip=False")
  local_batch_size = global_batch_size // process_count

  source = make_source(config) if source is None else source
  per_process = len(source) // process_count
  if per_process < local_batch_size:
    raise ValueError(
        f"{source!r} has {len(source)} records: {per_process} per process, fewer than "
        f"the local batch size {local_batch_size}")

  counter = BadRecordCounter()
  if is_t2i:
    load = t2i.T2ILoadFn(source=source, on_bad_record=config.on_bad_record, counter=counter)
  else:
    load = _LoadFn(source=source, shard_size=per_process, image_size=config.image_size,
                   num_channels=config.num_channels, random_flip=config.random_flip,
                   seed=seed, on_bad_record=config.on_bad_record, counter=counter,
                   extra_keys=extras)

  ds = grain.MapDataset.range(len(source))
  ds = ds[: per_process * process_count][process_index::process_count]
  if config.shuffle:
    ds = ds.shuffle(seed=_grain_seed(seed))
  ds = ds.repeat(num_epochs)
  ds = ds.map_with_index(load)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=config.num_threads, prefetch_buffer_size=config.prefetch))
  ds = ds.filter(lambda x: x is not None)
  ds = ds.batch(local_batch_size, drop_remainder=True)
  if config.num_workers > 0:
    # grain's worker processes read absl flags; outside absl.app.run (tests,
    # notebooks) they are unparsed, so use their defaults.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.num_workers,
        per_worker_buffer_size=config.worker_buffer_size))
  return Pipeline(dataset=ds, source=source, config=config,
                  local_batch_size=local_batch_size, examples_per_process=per_process,
                  bad_records=counter)
