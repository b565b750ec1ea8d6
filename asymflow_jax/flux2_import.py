"""Streaming import of a diffusers FLUX.2 ``transformer/`` folder into
:class:`~asymflow_jax.models.flux2.Flux2Transformer` parameters.

The folder holds ``config.json`` and either one ``diffusion_pytorch_model.safetensors`` or shards listed by a
``*.safetensors.index.json`` (``weight_map``). Safetensors headers are parsed here (8-byte little-endian
header length + JSON) and the data is memory-mapped with numpy, so bfloat16 (via ``ml_dtypes``), float16 and
float32 tensors are read without torch and a slice reads only its own bytes.

Key mapping (Flax path -> diffusers key): module names joined by "."; ``kernel`` (in, out) <- ``weight``
(out, in) transposed; ``scale`` (RMSNorm gain) <- ``weight``; the scanned stacks ``transformer_blocks`` and
``single_transformer_blocks`` have a leading layer axis i <- ``<stack>.{i}.<rest>``; the double blocks'
``attn/to_out`` <- ``attn.to_out.0``. E.g. ``transformer_blocks/attn/to_q/kernel[i]`` <-
``transformer_blocks.{i}.attn.to_q.weight``.

:func:`load_diffusers_transformer` first checks every key and shape (and the config) against the model's
parameter tree (``jax.eval_shape`` of init) and raises one ``ValueError`` listing all problems before any
tensor data is read; then each parameter is built with ``jax.make_array_from_callback`` straight into its
target sharding, each shard reading only its slice (for a stacked parameter, only its layers), so the full
parameter set is never materialised on the host.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import struct
from typing import Any, Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

import jax
import flax.linen as nn

from asymflow_jax.models.flux2 import Flux2Config, Flux2Transformer, abstract_params, param_specs
from asymflow_jax.sharding import logical_to_sharding

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
STACKS = ("transformer_blocks", "single_transformer_blocks")
SINGLE_FILE = "diffusion_pytorch_model.safetensors"

# -------------------------------------------------------------------------------- safetensors


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a safetensors file: dtype code ("BF16", ...), shape, and its byte range in the file."""

  path: pathlib.Path
  dtype: str
  shape: tuple[int, ...]
  begin: int    # absolute file offsets
  end: int


def read_safetensors_header(path) -> dict[str, TensorInfo]:
  """{name: TensorInfo} of a .safetensors file, from its header only (no tensor data is read)."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes).")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise ValueError(f"{path}: header length {n} exceeds the file size {size}.")
    header = json.loads(f.read(n))
  base = 8 + n
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    begin, end = entry["data_offsets"]
    out[name] = TensorInfo(path, entry["dtype"], tuple(int(s) for s in entry["shape"]), base + begin, base + end)
  return out


def checkpoint_tensors(folder, single_file: str = SINGLE_FILE) -> dict[str, TensorInfo]:
  """{key: TensorInfo} over a diffusers (or transformers) folder: the ``*.safetensors.index.json`` shards if
  there is an index, else ``single_file`` (default ``diffusion_pytorch_model.safetensors``; transformers writes
  ``model.safetensors``) or the folder's only ``.safetensors`` file."""
  folder = pathlib.Path(folder)
  indexes = sorted(folder.glob("*.safetensors.index.json"))
  if len(indexes) > 1:
    raise ValueError(f"{folder}: several safetensors indexes {[p.name for p in indexes]}.")
  if indexes:
    weight_map = json.loads(indexes[0].read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
      raise FileNotFoundError(f"{indexes[0]} lists shards that are not in {folder}: {missing}")
    tensors = {}
    for f in files:
      for name, info in read_safetensors_header(folder / f).items():
        if weight_map.get(name) == f:
          tensors[name] = info
    absent = sorted(k for k, f in weight_map.items() if k not in tensors)
    if absent:
      raise ValueError(f"{indexes[0]}: keys not found in their shards: {absent}")
    return tensors
  single = folder / single_file
  if not single.is_file():
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
      raise FileNotFoundError(f"{folder}: no {single_file}, no *.safetensors.index.json and not exactly one "
                              f"*.safetensors file ({[p.name for p in files]}).")
    single = files[0]
  return read_safetensors_header(single)


def tensor_view(info: TensorInfo, maps: dict | None = None) -> np.ndarray:
  """A read-only memory-mapped numpy view of one tensor (torch layout); slicing it reads only the slice.
  ``maps`` caches one np.memmap per file across calls."""
  if info.dtype not in SAFETENSORS_DTYPES:
    raise ValueError(f"{info.path}: unsupported dtype {info.dtype}; supported: {sorted(SAFETENSORS_DTYPES)}.")
  maps = {} if maps is None else maps
  mm = maps.get(info.path)
  if mm is None:
    mm = maps[info.path] = np.memmap(info.path, dtype=np.uint8, mode="r")
  return mm[info.begin:info.end].view(SAFETENSORS_DTYPES[info.dtype]).reshape(info.shape)


def read_state_dict(folder) -> dict[str, np.ndarray]:
  """{key: memory-mapped numpy array} (torch layout, stored dtype) of a diffusers folder."""
  maps = {}
  return {k: tensor_view(info, maps) for k, info in checkpoint_tensors(folder).items()}


def read_diffusers_config(folder) -> Flux2Config:
  """The :class:`Flux2Config` of a diffusers ``transformer/`` folder (its config.json)."""
  return Flux2Config.from_dict(json.loads((pathlib.Path(folder) / "config.json").read_text()))


# ------------------------------------------------------------------------------------ mapping


@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Where one Flax parameter comes from: its diffusers keys (one per layer for a stacked parameter) and
  whether the torch tensors are transposed (Linear weights)."""

  keys: tuple[str, ...]
  stacked: bool
  transpose: bool

  def torch_shape(self, flax_shape) -> tuple[int, ...]:
    shape = tuple(flax_shape[1:] if self.stacked else flax_shape)
    return shape[::-1] if self.transpose else shape


def key_names(path) -> tuple[str, ...]:
  """Module names of a jax key path, e.g. ("transformer_blocks", "attn", "to_q", "kernel")."""
  return tuple(str(getattr(k, "key", k)) for k in path)


def param_source(path: Iterable[str], flax_shape) -> ParamSource:
  """The diffusers source of the Flax parameter at ``path`` (module names + leaf name)."""
  names = tuple(path)
  *modules, leaf = names
  if leaf not in ("kernel", "scale"):
    raise ValueError(f"no diffusers mapping for parameter {'/'.join(names)}.")
  stacked = bool(modules) and modules[0] in STACKS
  if stacked and modules[0] == "transformer_blocks" and modules[1:] == ["attn", "to_out"]:
    modules = modules + ["0"]
  rest = ".".join(modules[1:] if stacked else modules) + ".weight"
  keys = tuple(f"{modules[0]}.{i}.{rest}" for i in range(flax_shape[0])) if stacked else (rest,)
  return ParamSource(keys, stacked, leaf == "kernel")


def _unboxed_abstract(model: Flux2Transformer):
  return nn.meta.unbox(abstract_params(model))


def _as_model(model_config) -> Flux2Transformer:
  if isinstance(model_config, Flux2Transformer):
    return model_config
  if isinstance(model_config, Mapping):
    model_config = Flux2Config.from_dict(model_config)
  if not isinstance(model_config, Flux2Config):
    raise TypeError(f"expected a Flux2Config, a config dict or a Flux2Transformer, got {type(model_config)}.")
  return Flux2Transformer(model_config)


def param_sources(model_config) -> dict[tuple[str, ...], tuple[ParamSource, jax.ShapeDtypeStruct]]:
  """{flax path: (source, abstract leaf)} for every parameter of the model."""
  return _sources(_unboxed_abstract(_as_model(model_config)))


def _sources(abstract):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = key_names(path)
    out[names] = (param_source(names, leaf.shape), leaf)
  return out


def tensor_problems(sources, tensors: Mapping[str, Any], where: str = "checkpoint") -> list[str]:
  """Every missing key, unexpected key, wrong shape, unsupported dtype or corrupt entry of ``tensors``
  ({key: TensorInfo or array}) against ``sources`` (:func:`param_sources`)."""
  expected = {}
  for (src, leaf) in sources.values():
    for k in src.keys:
      expected[k] = src.torch_shape(leaf.shape)
  return expected_tensor_problems(expected, tensors, where)


def expected_tensor_problems(expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, Any],
                             where: str = "checkpoint") -> list[str]:
  """Every missing key, unexpected key, wrong shape, unsupported dtype or corrupt entry of ``tensors``
  ({key: TensorInfo or array}) against ``expected`` ({key: torch-layout shape}); model-independent."""
  problems = []
  for k in sorted(set(expected) - set(tensors)):
    problems.append(f"missing key {k} (expected shape {expected[k]})")
  for k in sorted(set(tensors) - set(expected)):
    problems.append(f"unexpected key {k} (shape {tuple(tensors[k].shape)})")
  for k in sorted(set(expected) & set(tensors)):
    t = tensors[k]
    if tuple(t.shape) != expected[k]:
      problems.append(f"wrong shape for {k}: {tuple(t.shape)} in the {where}, the model expects {expected[k]}")
    if isinstance(t, TensorInfo):
      if t.dtype not in SAFETENSORS_DTYPES:
        problems.append(f"unsupported dtype {t.dtype} for {k} (supported: {sorted(SAFETENSORS_DTYPES)})")
      elif t.end - t.begin != math.prod(t.shape) * SAFETENSORS_DTYPES[t.dtype].itemsize:
        problems.append(f"corrupt entry {k}: {t.end - t.begin} bytes for shape {t.shape} {t.dtype}")
  return problems


def _raise(where: str, problems: list[str]) -> None:
  if problems:
    raise ValueError(f"{where} does not match the FLUX.2 model ({len(problems)} problems):\n  "
                     + "\n  ".join(problems))


def check_tensors(model_config, tensors: Mapping[str, Any], *, where: str = "checkpoint") -> None:
  """Raises one ValueError listing all :func:`tensor_problems` of ``tensors`` for the model."""
  _raise(where, tensor_problems(param_sources(model_config), tensors, where))


def _config_problems(folder: pathlib.Path, config: Flux2Config) -> list[str]:
  path = folder / "config.json"
  if not path.is_file():
    return []
  theirs = read_diffusers_config(folder).to_dict()
  ours = config.to_dict()
  return [f"config {k}: {theirs[k]!r} in {path}, the model has {ours[k]!r}"
          for k in ours if theirs.get(k) != ours[k]]


# ------------------------------------------------------------------------------------ loading


def _read_slice(views: Callable[[int], np.ndarray], src: ParamSource, index, dtype) -> np.ndarray:
  """The Flax-layout block ``index`` (slices over the Flax global shape) of one parameter."""
  index = tuple(index)
  if src.stacked:
    layer_slice, index = index[0], index[1:]
    layers = range(len(src.keys))[layer_slice]
  else:
    layers = [0]
  blocks = []
  for i in layers:
    view = views(i)
    if src.transpose:
      block = view[index[::-1]].T if index else view.T
    else:
      block = view[index] if index else view
    blocks.append(np.asarray(block, dtype=dtype))
  out = np.stack(blocks) if src.stacked else blocks[0]
  return np.ascontiguousarray(out)


def target_shardings(specs, abstract, shardings):
  """A sharding per leaf of ``abstract`` from ``shardings``: None (the first local device), one Sharding for
  all, a Mesh (``specs()``, the model's logical PartitionSpecs, mapped by LOGICAL_RULES) or a tree as is."""
  if shardings is None:
    return jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract)
  if isinstance(shardings, jax.sharding.Mesh):
    return logical_to_sharding(specs(), abstract, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda _: shardings, abstract)
  return shardings


def stream_params(abstract, targets, read, dtype=None):
  """Builds every leaf of ``abstract`` with ``jax.make_array_from_callback`` in its sharding from ``targets``;
  ``read(names, index, np_dtype)`` returns the block ``index`` of the parameter at module path ``names``
  (each shard reads only its own slice, nothing is gathered on the host). ``dtype`` (default: the leaf's)."""
  flat_targets = {key_names(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      targets, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}
  names_of = {key_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  if set(flat_targets) != names_of:
    raise ValueError("shardings do not match the parameter tree: "
                     f"{sorted('/'.join(p) for p in set(flat_targets) ^ names_of)}")

  def build(path, leaf):
    names = key_names(path)
    target_dtype = np.dtype(dtype if dtype is not None else leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, flat_targets[names],
                                        lambda index: read(names, index, target_dtype))

  return jax.tree_util.tree_map_with_path(build, abstract)


def load_diffusers_transformer(folder, model_config, shardings=None, dtype=None, *, check_config: bool = True):
  """Parameters (a plain tree of jax.Arrays, like ``model.init(...)["params"]`` unboxed) from a diffusers
  FLUX.2 ``transformer/`` folder.

  Args:
    folder: the folder with config.json and the safetensors file(s).
    model_config: a :class:`Flux2Config` (or its dict) or a :class:`Flux2Transformer` (its param_dtype is the
      default ``dtype``).
    shardings: None (the first local device), one ``jax.sharding.Sharding`` for all, a tree of shardings like
      the params, or a ``Mesh`` (the model's logical axes mapped by ``asymflow_jax.sharding.LOGICAL_RULES``).
    dtype: parameter dtype on load (default: the model's ``param_dtype``, float32 for a config).
    check_config: also compare the folder's config.json (if any) with ``model_config``.

  Raises:
    ValueError: one error listing every missing / unexpected key, wrong shape, unsupported dtype and (with
      ``check_config``) config difference, before any tensor data is read.
  """
  folder = pathlib.Path(folder)
  model = _as_model(model_config)
  if dtype is None and isinstance(model_config, Flux2Transformer):
    dtype = model.param_dtype
  tensors = checkpoint_tensors(folder)
  abstract = _unboxed_abstract(model)
  sources = _sources(abstract)
  problems = _config_problems(folder, model.config) if check_config else []
  _raise(str(folder), problems + tensor_problems(sources, tensors, str(folder)))

  maps = {}

  def read(names, index, target_dtype):
    src, _ = sources[names]
    return _read_slice(lambda i: tensor_view(tensors[src.keys[i]], maps), src, index, target_dtype)

  return stream_params(abstract, target_shardings(lambda: param_specs(model), abstract, shardings), read, dtype)


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], model_config, dtype=np.float32):
  """In-memory variant: a {diffusers key: array (torch layout)} dict -> a numpy parameter tree (validated
  like :func:`load_diffusers_transformer`)."""
  abstract = _unboxed_abstract(_as_model(model_config))
  sources = _sources(abstract)
  _raise("state dict", tensor_problems(sources, state_dict, "state dict"))

  def build(path, leaf):
    src, _ = sources[key_names(path)]
    return _read_slice(lambda i: np.asarray(state_dict[src.keys[i]]), src, (slice(None),) * len(leaf.shape),
                       np.dtype(dtype))

  return jax.tree_util.tree_map_with_path(build, abstract)


def params_to_state_dict(params, model_config) -> dict[str, np.ndarray]:
  """The inverse mapping: a parameter tree -> {diffusers key: numpy array in torch layout}."""
  sources = param_sources(model_config)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    src, _ = sources[key_names(path)]
    arr = np.asarray(leaf)
    for i, key in enumerate(src.keys):
      a = arr[i] if src.stacked else arr
      out[key] = np.ascontiguousarray(a.T if src.transpose else a)
  return out


def save_safetensors(path, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes a .safetensors file (F32/F16/BF16/F64 numpy arrays) without torch or the safetensors package."""
  codes = {v: k for k, v in SAFETENSORS_DTYPES.items()}
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  tmp = pathlib.Path(f"{path}.tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.tobytes())
  os.replace(tmp, path)
