r"""Text-to-image finetuning data (AsymFLUX.2 klein, spec section 8): images + cached FLUX.2 inputs.

Each example holds the pixels, the FLUX.2 latents the transformer sees (VAE latent, 32 channels at
H/8, patchified 2x2 channel-first (c, py, px) -> 128 channels at H/16, then normalised with the VAE's
BatchNorm running statistics, as diffusers' ``Flux2KleinPipeline._encode_vae_image``), and the prompt
embedding (Qwen3 hidden states of layers (9, 18, 27) stacked to ``(L, 3 * hidden)``, padded to
``max_sequence_length``, as ``Flux2KleinPipeline._get_qwen3_prompt_embeds``). Written by
``python -m asymflow_jax.data.t2i_prep``; read by :class:`T2ISource` (``config.data.source='t2i'``).

Decisions:
  * One fixed resolution ``H x W`` per dataset (H, W multiples of 16; non-square allowed): images are
    centre-cropped / Lanczos-resized once at prep time, so every record has the same shapes and the
    grain pipeline batches them directly. Aspect-ratio buckets (several resolutions, a bucket-aware
    batch sampler) are a later extension: they would be separate datasets / a ``buckets`` field.
  * No random flips (the cached latents would no longer match the pixels).
  * The empty-prompt embedding (classifier-free guidance, caption dropout) is stored once per
    dataset (``empty_prompt.npy``), not per record. Caption dropout is done by the train step, like
    label dropout.
  * Images are stored raw (uint8, no PNG): exact and no decode cost. Latents are stored float16 by
    default (BatchNorm-normalised values are O(1); float16 keeps 3 more mantissa bits than
    bfloat16), or bfloat16. Prompt embeddings are always bfloat16 (the text encoder's compute dtype;
    Qwen3 hidden states have outliers beyond the float16 range). Casts round to nearest even; a
    non-finite value after the cast is an error at write time.

Dataset folder::

    meta.json                     # written last: a folder without it is incomplete
    empty_prompt.npy              # float32 [L, D] holding bfloat16-exact values
    data-00000.array_record ...   # one record per example, ArrayRecord group_size 1

``meta.json`` (see :func:`read_meta`)::

    {"format": "asymflow_t2i", "version": 1, "num_records": N,
     "resolution": [H, W], "latent_downsample": 16,
     "arrays": {"image": {"shape": [H, W, 3], "dtype": "uint8"},
                "latents": {"shape": [H/16, W/16, C], "dtype": "float16" | "bfloat16"},
                "prompt_embeds": {"shape": [L, D], "dtype": "bfloat16"}},
     "shards": [{"file": "data-00000.array_record", "num_records": n0}, ...],
     "empty_prompt": {"file": "empty_prompt.npy", "num_tokens": k},
     "encoder": {...identity of the encoders: name, folder, layers, dtypes...}, ...}

Record encoding (dependency-free, all integers little endian, arrays C-order little endian)::

    header   <4sBBHIi   magic b"AFT2", version u8 = 1, num_arrays u8 = 3, flags u16 = 0,
                        caption_nbytes u32, num_tokens i32 (true prompt token count, -1 = unknown)
    3 x array block:
      <BBB              name_len u8, dtype code u8 (1 uint8, 2 float16, 3 bfloat16, 4 float32), ndim u8
      name              ASCII: "image", "latents", "prompt_embeds" (in this order)
      <{ndim}I          shape
      data              prod(shape) * itemsize bytes (bfloat16 = the high 16 bits of the float32)
    caption             caption_nbytes bytes of UTF-8

Batches of the grain pipeline (``B`` = per-process batch)::

    {"image": float32[B, H, W, 3] in [-1, 1], "latents": float32[B, H/16, W/16, C],
     "prompt_embeds": bfloat16[B, L, D] (ml_dtypes), "num_tokens": int32[B]}
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
import struct
from typing import Any, Mapping

import numpy as np

from asymflow_jax.data import sources

FORMAT_NAME = "asymflow_t2i"
FORMAT_VERSION = 1
RECORD_MAGIC = b"AFT2"
RECORD_VERSION = 1
META_FILE = "meta.json"
EMPTY_PROMPT_FILE = "empty_prompt.npy"
SHARD_PATTERN = "data-{:05d}.array_record"
LATENT_DOWNSAMPLE = 16       # FLUX.2: VAE /8, then 2x2 patchify
ARRAY_NAMES = ("image", "latents", "prompt_embeds")
LATENT_DTYPES = ("float16", "bfloat16")
BATCH_KEYS = ("image", "latents", "prompt_embeds", "num_tokens")

_HEADER = struct.Struct("<4sBBHIi")
_ARRAY_HEADER = struct.Struct("<BBB")
_DTYPE_CODES = {"uint8": 1, "float16": 2, "bfloat16": 3, "float32": 4}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
_STORAGE = {"uint8": np.dtype("<u1"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"),
            "float32": np.dtype("<f4")}
_WANT_DTYPES = {"image": ("uint8",), "latents": LATENT_DTYPES, "prompt_embeds": ("bfloat16",)}


# ----------------------------------------------------------------------------
# bfloat16 without ml_dtypes (the writer runs in encoder environments too).
# ----------------------------------------------------------------------------


def float32_to_bfloat16_bits(x) -> np.ndarray:
  """float32 -> uint16 bfloat16 bit patterns, round to nearest even (NaN stays NaN)."""
  x = np.ascontiguousarray(x, dtype=np.float32)
  u = x.view(np.uint32)
  bits = ((u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
  nan = np.isnan(x)
  if nan.any():
    bits[nan] = ((u[nan] >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)) | np.uint16(0x7FC0)
  return bits


def bfloat16_bits_to_float32(bits) -> np.ndarray:
  """uint16 bfloat16 bit patterns -> float32 (exact)."""
  return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _bfloat16():
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return ml_dtypes.bfloat16


def _bits_as_bfloat16(bits: np.ndarray) -> np.ndarray:
  """uint16 bit patterns viewed (no copy) as an ml_dtypes bfloat16 array."""
  return bits.astype(np.dtype("=u2"), copy=False).view(_bfloat16())


def _to_storage(name: str, value, dtype: str) -> np.ndarray:
  """A float / bfloat16 array cast to its storage dtype (bfloat16 -> uint16 bits); ValueError if not finite."""
  value = np.asarray(value)
  if value.dtype.name == "bfloat16":
    if dtype == "bfloat16":
      out = value.view(np.uint16)
      finite = np.isfinite(bfloat16_bits_to_float32(out))
      return _check_finite(name, out, finite, dtype)
    value = value.astype(np.float32)
  if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)) or value.dtype == np.bool_:
    raise ValueError(f"{name}: dtype {value.dtype}; expected real numbers")
  if dtype == "bfloat16":
    out = float32_to_bfloat16_bits(value)
    return _check_finite(name, out, np.isfinite(bfloat16_bits_to_float32(out)), dtype)
  with np.errstate(over="ignore"):   # reported below
    out = value.astype(_STORAGE[dtype])
  return _check_finite(name, out, np.isfinite(out), dtype)


def _check_finite(name, out, finite, dtype):
  if not finite.all():
    raise ValueError(f"{name}: {int((~finite).sum())} value(s) are not finite after the cast to {dtype} "
                     f"(non-finite input, or beyond the {dtype} range)")
  return out


# ----------------------------------------------------------------------------
# Records.
# ----------------------------------------------------------------------------


def encode_record(image, latents, prompt_embeds, caption: str, *, num_tokens: int = -1,
                  latents_dtype: str = "float16") -> bytes:
  """One example -> record bytes (format in the module docstring).

  Args:
    image: uint8 [H, W, 3].
    latents: float [h, w, C] (cast to ``latents_dtype``: 'float16' or 'bfloat16').
    prompt_embeds: float or bfloat16 [L, D] (cast to bfloat16).
    caption: the prompt text.
    num_tokens: true (unpadded) prompt token count, or -1 if unknown.
  """
  if latents_dtype not in LATENT_DTYPES:
    raise ValueError(f"latents_dtype={latents_dtype!r}: expected one of {LATENT_DTYPES}")
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image: {image.dtype}{list(image.shape)}; expected uint8 [H, W, 3]")
  latents = np.asarray(latents)
  if latents.ndim != 3:
    raise ValueError(f"latents: shape {list(latents.shape)}; expected [h, w, C]")
  prompt_embeds = np.asarray(prompt_embeds)
  if prompt_embeds.ndim != 2:
    raise ValueError(f"prompt_embeds: shape {list(prompt_embeds.shape)}; expected [L, D]")
  if not isinstance(caption, str):
    raise ValueError(f"caption: {type(caption).__name__}; expected str")
  num_tokens = int(num_tokens)
  if not -1 <= num_tokens <= prompt_embeds.shape[0]:
    raise ValueError(f"num_tokens={num_tokens}: expected -1 (unknown) or 0..L={prompt_embeds.shape[0]}")
  text = caption.encode("utf-8")
  arrays = [("image", image.astype("<u1", copy=False), "uint8"),
            ("latents", _to_storage("latents", latents, latents_dtype), latents_dtype),
            ("prompt_embeds", _to_storage("prompt_embeds", prompt_embeds, "bfloat16"), "bfloat16")]
  parts = [_HEADER.pack(RECORD_MAGIC, RECORD_VERSION, len(arrays), 0, len(text), num_tokens)]
  for name, value, dtype in arrays:
    parts.append(_ARRAY_HEADER.pack(len(name), _DTYPE_CODES[dtype], value.ndim))
    parts.append(name.encode("ascii"))
    parts.append(struct.pack(f"<{value.ndim}I", *value.shape))
    parts.append(np.ascontiguousarray(value, dtype=_STORAGE[dtype]).tobytes())
  parts.append(text)
  return b"".join(parts)


def decode_record(data: bytes) -> dict:
  """Record bytes -> ``{"image", "latents", "prompt_embeds", "num_tokens", "caption"}``.

  Arrays keep their stored dtype (uint8; float16 or ml_dtypes bfloat16) and are read-only views of
  ``data``. Raises ValueError describing what is malformed.
  """
  data = memoryview(data)
  if len(data) < _HEADER.size:
    raise ValueError(f"record of {len(data)} bytes is shorter than the {_HEADER.size}-byte header")
  magic, version, num_arrays, _, caption_nbytes, num_tokens = _HEADER.unpack_from(data, 0)
  if magic != RECORD_MAGIC:
    raise ValueError(f"bad magic {bytes(magic)!r}; expected {RECORD_MAGIC!r} (not a t2i record)")
  if version != RECORD_VERSION:
    raise ValueError(f"record version {version}; this reader supports version {RECORD_VERSION}")
  if num_arrays != len(ARRAY_NAMES):
    raise ValueError(f"record has {num_arrays} arrays; expected {len(ARRAY_NAMES)} {list(ARRAY_NAMES)}")
  out: dict[str, Any] = {}
  pos = _HEADER.size
  try:
    for want in ARRAY_NAMES:
      name_len, code, ndim = _ARRAY_HEADER.unpack_from(data, pos)
      pos += _ARRAY_HEADER.size
      name = bytes(data[pos:pos + name_len]).decode("ascii", errors="replace")
      pos += name_len
      if name != want:
        raise ValueError(f"array {len(out)} is named {name!r}; expected {want!r}")
      if code not in _CODE_DTYPES:
        raise ValueError(f"array {name!r} has unknown dtype code {code}; expected one of {sorted(_CODE_DTYPES)}")
      dtype = _CODE_DTYPES[code]
      shape = struct.unpack_from(f"<{ndim}I", data, pos)
      pos += 4 * ndim
      count = math.prod(shape)
      nbytes = count * _STORAGE[dtype].itemsize
      if pos + nbytes > len(data):
        raise ValueError(f"array {name!r} {dtype}{list(shape)} needs {nbytes} bytes; the record is truncated")
      value = np.frombuffer(data, dtype=_STORAGE[dtype], count=count, offset=pos).reshape(shape)
      pos += nbytes
      out[name] = _bits_as_bfloat16(value) if dtype == "bfloat16" else value.astype(value.dtype.newbyteorder("="),
                                                                                   copy=False)
  except struct.error as e:
    raise ValueError(f"truncated record header: {e}") from e
  if pos + caption_nbytes != len(data):
    raise ValueError(f"record has {len(data) - pos} bytes after the arrays; the header says a caption of "
                     f"{caption_nbytes} bytes")
  try:
    out["caption"] = bytes(data[pos:]).decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"caption is not valid UTF-8: {e}") from e
  out["num_tokens"] = int(num_tokens)
  return out


# ----------------------------------------------------------------------------
# meta.json.
# ----------------------------------------------------------------------------


def _meta_path(path) -> str:
  path = os.fspath(path)
  return path if os.path.basename(path) == META_FILE else os.path.join(path, META_FILE)


def read_meta(path) -> dict:
  """Reads and validates ``meta.json`` of a t2i dataset folder (``path`` = the folder or the file).

  Raises FileNotFoundError if it is missing, ValueError naming the field, its value and what was
  expected if it is malformed.
  """
  meta_path = _meta_path(path)
  if not os.path.exists(meta_path):
    folder = os.path.dirname(meta_path)
    hint = (" (shards without meta.json: the prep run did not finish)"
            if os.path.isdir(folder) and any(f.endswith(".array_record") for f in os.listdir(folder)) else "")
    raise FileNotFoundError(f"t2i dataset: {meta_path} not found{hint}; write the dataset with "
                            "python -m asymflow_jax.data.t2i_prep")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{meta_path}: not readable JSON ({e})") from e
  validate_meta(meta, meta_path)
  return meta


def _shape_ok(shape, ndim) -> bool:
  return (isinstance(shape, list) and len(shape) == ndim
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape))


def validate_meta(meta: Mapping, where: str = META_FILE) -> None:
  """Checks a meta dict (see the module docstring); ValueError naming ``where``, the field and the value."""
  def bad(field, value, expected):
    raise ValueError(f"{where}: {field}={value!r}; expected {expected}")

  if not isinstance(meta, Mapping):
    bad("meta", type(meta).__name__, "a JSON object")
  if meta.get("format") != FORMAT_NAME:
    bad("format", meta.get("format"), repr(FORMAT_NAME))
  version = meta.get("version")
  if not isinstance(version, int) or version < 1:
    bad("version", version, f"an integer >= 1 (this reader supports {FORMAT_VERSION})")
  if version > FORMAT_VERSION:
    bad("version", version, f"<= {FORMAT_VERSION}: written by a newer asymflow_jax; upgrade to read it")
  res = meta.get("resolution")
  if not _shape_ok(res, 2):
    bad("resolution", res, "[H, W] positive integers")
  down = meta.get("latent_downsample")
  if not isinstance(down, int) or isinstance(down, bool) or down < 1:
    bad("latent_downsample", down, "a positive integer (16 for FLUX.2)")
  if res[0] % down or res[1] % down:
    bad("resolution", res, f"multiples of latent_downsample={down}")
  arrays = meta.get("arrays")
  if not isinstance(arrays, Mapping) or sorted(arrays) != sorted(ARRAY_NAMES):
    bad("arrays", sorted(arrays) if isinstance(arrays, Mapping) else arrays, f"entries for {list(ARRAY_NAMES)}")
  for name, ndim in zip(ARRAY_NAMES, (3, 3, 2)):
    spec = arrays[name]
    if not isinstance(spec, Mapping) or not _shape_ok(spec.get("shape"), ndim):
      bad(f"arrays.{name}.shape", spec.get("shape") if isinstance(spec, Mapping) else spec,
          f"{ndim} positive integers")
    if spec.get("dtype") not in _WANT_DTYPES[name]:
      bad(f"arrays.{name}.dtype", spec.get("dtype"), f"one of {_WANT_DTYPES[name]}")
  if arrays["image"]["shape"] != [res[0], res[1], 3]:
    bad("arrays.image.shape", arrays["image"]["shape"], f"[{res[0]}, {res[1]}, 3] (resolution + RGB)")
  if arrays["latents"]["shape"][:2] != [res[0] // down, res[1] // down]:
    bad("arrays.latents.shape", arrays["latents"]["shape"],
        f"[{res[0] // down}, {res[1] // down}, C] (resolution / latent_downsample)")
  shards = meta.get("shards")
  if not isinstance(shards, list) or not shards:
    bad("shards", shards, "a non-empty list of {file, num_records}")
  for i, shard in enumerate(shards):
    if (not isinstance(shard, Mapping) or not isinstance(shard.get("file"), str) or not shard["file"]
        or os.path.basename(shard["file"]) != shard["file"] or not isinstance(shard.get("num_records"), int)
        or shard["num_records"] < 1):
      bad(f"shards[{i}]", shard, "{'file': a file name in the dataset folder, 'num_records': >= 1}")
  total = sum(s["num_records"] for s in shards)
  if meta.get("num_records") != total:
    bad("num_records", meta.get("num_records"), f"{total} (the sum over the shards)")
  empty = meta.get("empty_prompt")
  max_tokens = arrays["prompt_embeds"]["shape"][0]
  if (not isinstance(empty, Mapping) or not isinstance(empty.get("file"), str)
      or not isinstance(empty.get("num_tokens"), int) or not -1 <= empty["num_tokens"] <= max_tokens):
    bad("empty_prompt", empty, "{'file': 'empty_prompt.npy', 'num_tokens': -1 (unknown) or 0..L}")


# ----------------------------------------------------------------------------
# Writer.
# ----------------------------------------------------------------------------


class T2IWriter:
  """Writes a t2i dataset folder: call :meth:`write` per example, then :meth:`finish`.

  Shards are written as ``*.tmp`` and renamed when full; ``meta.json`` is written last (atomically),
  so a folder without it is an unfinished dataset. Used as a context manager, an exception aborts
  (removes what was written). Shapes are fixed by the first record and checked for every other.
  """

  def __init__(self, out_dir, resolution, *, records_per_shard: int = 1000, latents_dtype: str = "float16",
               latent_downsample: int = LATENT_DOWNSAMPLE, options: str = "group_size:1",
               overwrite: bool = False):
    """Args: out_dir: dataset folder (created). resolution: (H, W), multiples of ``latent_downsample``.
    options: ArrayRecordWriter options. overwrite: replace an existing dataset in ``out_dir``."""
    h, w = (int(v) for v in resolution)
    if h < 1 or w < 1 or h % latent_downsample or w % latent_downsample:
      raise ValueError(f"resolution={tuple(resolution)}: expected (H, W) positive multiples of "
                       f"{latent_downsample} (the latent grid is H/{latent_downsample} x W/{latent_downsample})")
    if latents_dtype not in LATENT_DTYPES:
      raise ValueError(f"latents_dtype={latents_dtype!r}: expected one of {LATENT_DTYPES}")
    if records_per_shard < 1:
      raise ValueError(f"records_per_shard={records_per_shard}: expected an integer >= 1")
    self.out_dir = os.fspath(out_dir)
    self.resolution = (h, w)
    self.latent_downsample = latent_downsample
    self.records_per_shard = records_per_shard
    self.latents_dtype = latents_dtype
    self.options = options
    os.makedirs(self.out_dir, exist_ok=True)
    existing = sorted(f for f in os.listdir(self.out_dir)
                      if f in (META_FILE, EMPTY_PROMPT_FILE) or f.endswith((".array_record", ".array_record.tmp")))
    if existing and not overwrite:
      raise FileExistsError(f"{self.out_dir} already holds a t2i dataset ({existing[:3]}...); choose an empty "
                            "folder or pass overwrite=True / --overwrite")
    for f in existing:
      os.remove(os.path.join(self.out_dir, f))
    self.shards: list[dict] = []
    self.shapes: dict[str, tuple[int, ...]] = {}
    self._writer = None
    self._count = 0       # records in the open shard
    self._closed = False

  def _open_shard(self):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    name = SHARD_PATTERN.format(len(self.shards))
    self._writer = array_record_module.ArrayRecordWriter(os.path.join(self.out_dir, name + ".tmp"), self.options)
    self.shards.append({"file": name, "num_records": 0})
    self._count = 0

  def _close_shard(self):
    if self._writer is None:
      return
    self._writer.close()
    self._writer = None
    name = self.shards[-1]["file"]
    os.replace(os.path.join(self.out_dir, name + ".tmp"), os.path.join(self.out_dir, name))

  def write(self, image, latents, prompt_embeds, caption: str, num_tokens: int = -1) -> None:
    """Adds one example (arguments as :func:`encode_record`); ValueError naming the bad array."""
    if self._closed:
      raise ValueError("T2IWriter is finished; no more records can be written")
    image, latents, prompt_embeds = np.asarray(image), np.asarray(latents), np.asarray(prompt_embeds)
    h, w = self.resolution
    d = self.latent_downsample
    if image.shape != (h, w, 3):
      raise ValueError(f"image shape {list(image.shape)}; expected [{h}, {w}, 3] (the dataset resolution)")
    if latents.ndim != 3 or latents.shape[:2] != (h // d, w // d):
      raise ValueError(f"latents shape {list(latents.shape)}; expected [{h // d}, {w // d}, C] "
                       f"(resolution / {d})")
    for name, value in (("latents", latents), ("prompt_embeds", prompt_embeds)):
      want = self.shapes.setdefault(name, tuple(value.shape))
      if tuple(value.shape) != want:
        raise ValueError(f"{name} shape {list(value.shape)} differs from the first record's {list(want)}")
    data = encode_record(image, latents, prompt_embeds, caption, num_tokens=num_tokens,
                         latents_dtype=self.latents_dtype)
    if self._writer is None:
      self._open_shard()
    self._writer.write(data)
    self._count += 1
    self.shards[-1]["num_records"] += 1
    if self._count == self.records_per_shard:
      self._close_shard()

  @property
  def num_records(self) -> int:
    return sum(s["num_records"] for s in self.shards)

  def finish(self, empty_prompt_embeds, *, empty_num_tokens: int = -1, encoder: Mapping | None = None,
             extra: Mapping | None = None) -> dict:
    """Closes the last shard, writes ``empty_prompt.npy`` and ``meta.json``; returns the meta dict.

    Args:
      empty_prompt_embeds: [L, D] embedding of the empty prompt "" (stored bfloat16-rounded as float32).
      empty_num_tokens: its true token count (-1 = unknown).
      encoder: JSON-able identity of the encoders (folder, model classes, layers, dtypes, ...).
      extra: more JSON-able fields for meta.json (e.g. prep statistics).
    """
    if self._closed:
      raise ValueError("T2IWriter.finish called twice")
    self._close_shard()
    if not self.num_records:
      self.abort()
      raise ValueError(f"no records were written to {self.out_dir}")
    empty = np.asarray(empty_prompt_embeds)
    if empty.shape != self.shapes["prompt_embeds"]:
      self.abort()
      raise ValueError(f"empty_prompt_embeds shape {list(empty.shape)}; expected "
                       f"{list(self.shapes['prompt_embeds'])} (the records' prompt_embeds)")
    empty = bfloat16_bits_to_float32(_to_storage("empty_prompt_embeds", empty, "bfloat16"))
    np.save(os.path.join(self.out_dir, EMPTY_PROMPT_FILE), empty, allow_pickle=False)
    h, w = self.resolution
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "num_records": self.num_records,
        "resolution": [h, w], "latent_downsample": self.latent_downsample,
        "arrays": {"image": {"shape": [h, w, 3], "dtype": "uint8"},
                   "latents": {"shape": list(self.shapes["latents"]), "dtype": self.latents_dtype},
                   "prompt_embeds": {"shape": list(self.shapes["prompt_embeds"]), "dtype": "bfloat16"}},
        "shards": [dict(s) for s in self.shards],
        "empty_prompt": {"file": EMPTY_PROMPT_FILE, "num_tokens": int(empty_num_tokens)},
        "encoder": dict(encoder or {}),
        **dict(extra or {}),
    }
    validate_meta(meta, os.path.join(self.out_dir, META_FILE))
    tmp = os.path.join(self.out_dir, META_FILE + ".tmp")
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(self.out_dir, META_FILE))
    self._closed = True
    return meta

  def abort(self) -> None:
    """Closes and removes everything this writer wrote."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    for s in self.shards:
      for f in (s["file"], s["file"] + ".tmp"):
        p = os.path.join(self.out_dir, f)
        if os.path.exists(p):
          os.remove(p)
    self.shards = []
    self._closed = True

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None and not self._closed:
      self.abort()
    return False


# ----------------------------------------------------------------------------
# Reader.
# ----------------------------------------------------------------------------


class T2ISource:
  """Random-access reader of a t2i dataset folder (grain source: ``len`` / ``__getitem__``).

  Opening validates ``meta.json``, that every shard exists and holds the number of records meta.json
  says, and the empty-prompt embedding. ``source[i]`` is ``{"image": uint8[H, W, 3], "latents":
  float16|bfloat16[h, w, C], "prompt_embeds": bfloat16[L, D], "num_tokens": int, "caption": str}``
  (stored dtypes; read-only arrays); a record that does not decode or does not match meta.json
  raises :class:`~asymflow_jax.data.sources.BadRecordError` naming the shard and the index.
  """

  def __init__(self, path):
    """``path``: the dataset folder (or its meta.json)."""
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    meta_path = _meta_path(path)
    self.path = os.path.dirname(meta_path) or "."
    self.meta = read_meta(meta_path)
    self.paths = [os.path.join(self.path, s["file"]) for s in self.meta["shards"]]
    missing = [p for p in self.paths if not os.path.exists(p)]
    if missing:
      raise FileNotFoundError(f"{meta_path} lists shard(s) that do not exist: {missing}")
    self._files = [array_record_data_source.ArrayRecordDataSource([p]) for p in self.paths]
    for p, f, s in zip(self.paths, self._files, self.meta["shards"]):
      if len(f) != s["num_records"]:
        raise ValueError(f"{p} holds {len(f)} records; {meta_path} says {s['num_records']}")
    self._ends = list(np.cumsum([s["num_records"] for s in self.meta["shards"]]))
    self._want = {name: (tuple(self.meta["arrays"][name]["shape"]), self.meta["arrays"][name]["dtype"])
                  for name in ARRAY_NAMES}
    self.empty_prompt_embeds = self._load_empty_prompt()
    self.empty_num_tokens = int(self.meta["empty_prompt"]["num_tokens"])

  def _load_empty_prompt(self) -> np.ndarray:
    path = os.path.join(self.path, self.meta["empty_prompt"]["file"])
    if not os.path.exists(path):
      raise FileNotFoundError(f"t2i dataset {self.path}: empty-prompt embedding {path} not found")
    try:
      empty = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a corrupt file.
      raise ValueError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from e
    want = self.prompt_embeds_shape
    if empty.dtype != np.float32 or empty.shape != want:
      raise ValueError(f"{path}: {empty.dtype}{list(empty.shape)}; expected float32{list(want)} "
                       "(the records' prompt_embeds shape)")
    bits = np.ascontiguousarray(empty).view(np.uint32)
    if (bits & np.uint32(0xFFFF)).any():
      raise ValueError(f"{path}: values are not bfloat16-exact; expected the bfloat16-rounded embedding "
                       "(as the records)")
    out = _bits_as_bfloat16((bits >> np.uint32(16)).astype(np.uint16))
    out.flags.writeable = False
    return out

  @property
  def resolution(self) -> tuple[int, int]:
    return tuple(self.meta["resolution"])

  @property
  def latents_shape(self) -> tuple[int, ...]:
    return self._want["latents"][0]

  @property
  def prompt_embeds_shape(self) -> tuple[int, ...]:
    return self._want["prompt_embeds"][0]

  def __len__(self) -> int:
    return int(self.meta["num_records"])

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"{self.path}: record index {index} out of range [0, {len(self)})")
    f = bisect.bisect_right(self._ends, index)
    return f, index - (int(self._ends[f - 1]) if f else 0)

  def locate(self, index: int) -> tuple[str, int]:
    """Global record index -> (shard path, index inside that shard)."""
    f, local = self._locate(int(index))
    return self.paths[f], local

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    f, local = self._locate(index)
    where = f"{self.paths[f]} record {local}" + (f" (global index {index})" if local != index else "")
    try:
      data = self._files[f][local]
    except Exception as e:
      raise sources.BadRecordError(f"{where}: cannot read record: {e}") from e
    try:
      ex = decode_record(data)
    except ValueError as e:
      raise sources.BadRecordError(f"{where}: {e}") from e
    for name, (shape, dtype) in self._want.items():
      got = ex[name]
      if got.shape != shape or got.dtype.name != dtype:
        raise sources.BadRecordError(
            f"{where}: {name} is {got.dtype.name}{list(got.shape)}; meta.json says {dtype}{list(shape)}")
    return ex

  def __repr__(self) -> str:
    return f"T2ISource({self.path!r}, {len(self)} records, resolution={self.resolution})"


def latents_to_grid(latents, patch_size: int = 2) -> np.ndarray:
  """Un-patchifies stored latents [..., h, w, p*p*c] (channel-first (c, py, px) packing, as FLUX.2)
  to the normalised latent grid [..., h*p, w*p, c]; ``asymflow.patchify(grid, p, channel_first=True)``
  gives the tokens back (so ``vr.latent_patch_size=2`` on the grid == patch 1 on the stored latents)."""
  z = np.asarray(latents)
  *lead, h, w, d = z.shape
  p = patch_size
  if d % (p * p):
    raise ValueError(f"latents channels {d} are not divisible by patch_size^2 = {p * p}")
  c = d // (p * p)
  z = z.reshape(*lead, h, w, c, p, p)
  n = len(lead)
  z = z.transpose(*range(n), n, n + 3, n + 1, n + 4, n + 2)  # (h, py, w, px, c)
  return z.reshape(*lead, h * p, w * p, c)


# ----------------------------------------------------------------------------
# Pipeline hooks (used by asymflow_jax.data.pipeline for source='t2i').
# ----------------------------------------------------------------------------


def check_pipeline_config(config) -> None:
  """ValueError if a data config cannot serve a t2i dataset (flips, channels, unknown extra keys)."""
  if config.random_flip:
    raise ValueError("config.random_flip=True with source='t2i': a flipped image would not match its cached "
                     "latents; set random_flip=False")
  if config.num_channels != 3:
    raise ValueError(f"config.num_channels={config.num_channels} with source='t2i': expected 3 (RGB)")
  extra = tuple(config.get("extra_keys", ()))
  allowed = BATCH_KEYS[1:]
  if any(k not in allowed for k in extra):
    raise ValueError(f"config.extra_keys={extra!r} with source='t2i': its batches always carry {list(allowed)}; "
                     "extra_keys may only name those (e.g. ('latents',) for the VR objective)")


@dataclasses.dataclass
class T2ILoadFn:
  """Picklable per-record transform for the grain pipeline: a :class:`T2ISource` record -> batch
  element ``{"image": float32[H, W, 3] in [-1, 1], "latents": float32[h, w, C], "prompt_embeds":
  bfloat16[L, D], "num_tokens": int32}`` (the caption stays in the source). No crop, no flip."""
  source: Any
  on_bad_record: str
  counter: Any = None

  def __call__(self, position: int, record_index: int):
    del position
    try:
      ex = self.source[int(record_index)]
    except sources.BadRecordError as e:
      if self.on_bad_record == "skip":
        if self.counter is not None:
          self.counter.add(e)
        return None
      raise
    image = ex["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # == pipeline.to_float
    return {"image": image, "latents": ex["latents"].astype(np.float32),
            "prompt_embeds": ex["prompt_embeds"], "num_tokens": np.int32(ex["num_tokens"])}

  def __getstate__(self):  # The lock in the counter cannot be pickled.
    state = dict(self.__dict__)
    state["counter"] = None
    return state
