"""Streaming import of a Hugging Face ``transformers`` DINOv2 checkpoint folder (``Dinov2Model`` or
``Dinov2WithRegistersModel``, e.g. a snapshot of facebook/dinov2-base) into
:class:`~asymflow_jax.models.dinov2.Dinov2Model` parameters.

The folder holds ``config.json`` and either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. The safetensors reading (own header parsing, numpy memory maps, bfloat16 via
``ml_dtypes``) is :mod:`asymflow_jax.flux2_import`'s.

Key mapping (Flax path -> checkpoint key), the names the Hub files and ``save_pretrained`` use: module names
joined by "."; ``kernel`` <- ``weight`` (Linear (out, in) transposed; the patch conv (D, C, p, p) permuted to
(p, p, C, D)); LayerNorm ``scale`` <- ``weight``; ``bias``, ``lambda1``, ``cls_token``, ``mask_token``,
``position_embeddings``, ``register_tokens`` keep their names. The scanned ``encoder/layer`` params have a
leading layer axis i <- ``encoder.layer.{i}.<rest>``. E.g. ``encoder/layer/attention/attention/query/kernel[i]``
<- ``encoder.layer.{i}.attention.attention.query.weight``.

transformers 5 renames some modules in memory (``attention.q_proj/k_proj/v_proj/o_proj``, SwiGLU
``mlp.gate_proj`` + ``mlp.up_proj`` / ``mlp.down_proj``) and converts back on save; a file written from such an
in-memory state dict is recognised (any of those names present) and mapped too (``weights_in`` <- the
concatenation [gate_proj; up_proj]).

:func:`load_hf_dinov2` checks every key and shape (and the config) and raises one ``ValueError`` listing all
problems before any tensor data is read; then each parameter is built with ``jax.make_array_from_callback``
straight into its target sharding, each shard reading only its slice.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

import numpy as np

import jax
import flax.linen as nn

from asymflow_jax.flux2_import import (checkpoint_tensors, expected_tensor_problems, key_names, stream_params,
                                       target_shardings, tensor_view)
from asymflow_jax.models.dinov2 import Dinov2Config, Dinov2Model, abstract_params, param_specs

SINGLE_FILE = "model.safetensors"
STACK = ("encoder", "layer")
HUB, TRANSFORMERS5 = "hub", "transformers5"
# checkpoint (Hub) module path -> transformers 5 in-memory name(s) (several: concatenated along torch axis 0)
_RENAMES = {
    "attention.attention.query": ("attention.q_proj",),
    "attention.attention.key": ("attention.k_proj",),
    "attention.attention.value": ("attention.v_proj",),
    "attention.output.dense": ("attention.o_proj",),
    "mlp.weights_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.weights_out": ("mlp.down_proj",),
}


# ------------------------------------------------------------------------------------ mapping


@dataclasses.dataclass(frozen=True)
class ParamSource:
  """Where one Flax parameter comes from: per layer (one entry when not stacked) the checkpoint keys that are
  concatenated along torch axis 0 (usually one), and the permutation ``perm`` with
  ``flax = torch.transpose(perm)`` (None: same layout)."""

  keys: tuple[tuple[str, ...], ...]
  stacked: bool
  perm: tuple[int, ...] | None

  def torch_shape(self, flax_shape) -> tuple[int, ...]:
    """The shape of the (concatenated) torch tensor of one layer."""
    shape = tuple(flax_shape[1:] if self.stacked else flax_shape)
    if self.perm is None:
      return shape
    out = [0] * len(shape)
    for i, j in enumerate(self.perm):
      out[j] = shape[i]
    return tuple(out)

  def expected(self, flax_shape) -> dict[str, tuple[int, ...]]:
    """{key: torch shape} of every checkpoint tensor this parameter reads."""
    shape = self.torch_shape(flax_shape)
    out = {}
    for group in self.keys:
      part = (shape[0] // len(group),) + shape[1:]
      for k in group:
        out[k] = part
    return out


def param_source(path, flax_shape, naming: str = HUB) -> ParamSource:
  """The checkpoint source of the Flax parameter at ``path`` (module names + leaf name)."""
  *modules, leaf = tuple(path)
  stacked = tuple(modules[:2]) == STACK
  rest = modules[2:] if stacked else modules
  module = ".".join(rest)
  tensor = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  ndim = len(flax_shape) - stacked
  perm = None
  if leaf == "kernel":
    perm = {2: (1, 0), 4: (2, 3, 1, 0)}.get(ndim)
    if perm is None:
      raise ValueError(f"no checkpoint mapping for the {ndim}-d kernel {'/'.join(path)}.")
  modules_out = (module,)
  if naming == TRANSFORMERS5:
    for hub, new in _RENAMES.items():
      if module == hub:
        modules_out = new
  elif naming != HUB:
    raise ValueError(f"unknown naming {naming!r}.")
  names = tuple(f"{m}.{tensor}" if m else tensor for m in modules_out)
  if stacked:
    keys = tuple(tuple(f"encoder.layer.{i}.{n}" for n in names) for i in range(flax_shape[0]))
  else:
    keys = (names,)
  return ParamSource(keys, stacked, perm)


def detect_naming(keys) -> str:
  """"transformers5" when the keys use transformers 5's in-memory module names, else "hub"."""
  markers = tuple(f".{n}." for names in _RENAMES.values() for n in names)
  return TRANSFORMERS5 if any(m in k for k in keys for m in markers) else HUB


def _as_model(model_config) -> Dinov2Model:
  if isinstance(model_config, Dinov2Model):
    return model_config
  if isinstance(model_config, Mapping):
    model_config = Dinov2Config.from_dict(model_config)
  if not isinstance(model_config, Dinov2Config):
    raise TypeError(f"expected a Dinov2Config, a config dict or a Dinov2Model, got {type(model_config)}.")
  return Dinov2Model(model_config)


def _sources(abstract, naming=HUB):
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
    names = key_names(path)
    out[names] = (param_source(names, leaf.shape, naming), leaf)
  return out


def param_sources(model_config, naming: str = HUB):
  """{flax path: (source, abstract leaf)} for every parameter of the model."""
  return _sources(nn.meta.unbox(abstract_params(_as_model(model_config))), naming)


def tensor_problems(sources, tensors: Mapping[str, Any], where: str = "checkpoint") -> list[str]:
  """Every missing / unexpected key, wrong shape, unsupported dtype or corrupt entry of ``tensors``."""
  expected = {}
  for src, leaf in sources.values():
    expected.update(src.expected(leaf.shape))
  return expected_tensor_problems(expected, tensors, where)


def _raise(where: str, problems: list[str]) -> None:
  if problems:
    raise ValueError(f"{where} does not match the DINOv2 model ({len(problems)} problems):\n  "
                     + "\n  ".join(problems))


def read_hf_dinov2_config(folder) -> Dinov2Config:
  """The :class:`Dinov2Config` of a transformers checkpoint folder (its config.json)."""
  return Dinov2Config.from_dict(json.loads((pathlib.Path(folder) / "config.json").read_text()))


def _config_problems(folder: pathlib.Path, config: Dinov2Config) -> list[str]:
  if not (folder / "config.json").is_file():
    return []
  try:
    theirs = read_hf_dinov2_config(folder).to_dict()
  except ValueError as e:
    return [f"config.json: {e}"]
  ours = config.to_dict()
  return [f"config {k}: {theirs[k]!r} in {folder / 'config.json'}, the model has {ours[k]!r}"
          for k in ours if theirs[k] != ours[k]]


# ------------------------------------------------------------------------------------ loading


def _read_slice(view, src: ParamSource, index, dtype) -> np.ndarray:
  """The Flax-layout block ``index`` (slices over the Flax global shape) of one parameter; ``view(key)`` gives a
  torch-layout (memory-mapped) array."""
  index = tuple(index)
  if src.stacked:
    layers, index = range(len(src.keys))[index[0]], index[1:]
  else:
    layers = [0]
  blocks = []
  for i in layers:
    group = src.keys[i]
    if len(group) == 1:
      t = view(group[0])
      if src.perm is None:
        block = t[index] if index else t
      else:
        torch_index = tuple(index[src.perm.index(j)] for j in range(len(src.perm))) if index else ()
        block = (t[torch_index] if torch_index else t).transpose(src.perm)
    else:
      t = np.concatenate([np.asarray(view(k)) for k in group], axis=0)
      t = t if src.perm is None else t.transpose(src.perm)
      block = t[index] if index else t
    blocks.append(np.asarray(block, dtype=dtype))
  return np.ascontiguousarray(np.stack(blocks) if src.stacked else blocks[0])


def load_hf_dinov2(folder, config=None, shardings=None, dtype=None, *, check_config: bool = True):
  """Parameters (a plain tree of jax.Arrays, like ``model.init(...)["params"]`` unboxed) from a transformers
  DINOv2 folder.

  Args:
    folder: the folder with config.json and ``model.safetensors`` (or shards + ``model.safetensors.index.json``).
    config: a :class:`Dinov2Config` (or its dict) or a :class:`Dinov2Model` (its param_dtype is the default
      ``dtype``); None: :func:`read_hf_dinov2_config` of the folder.
    shardings: None (the first local device), one ``jax.sharding.Sharding`` for all, a tree of shardings like
      the params, or a ``Mesh`` (the model's logical axes mapped by ``asymflow_jax.sharding.LOGICAL_RULES``).
    dtype: parameter dtype on load (default: the model's ``param_dtype``, float32 for a config).
    check_config: also compare the folder's config.json (if any) with ``config``.

  Raises:
    ValueError: one error listing every missing / unexpected key, wrong shape, unsupported dtype and (with
      ``check_config``) config difference, before any tensor data is read.
  """
  folder = pathlib.Path(folder)
  model = _as_model(read_hf_dinov2_config(folder) if config is None else config)
  if dtype is None and isinstance(config, Dinov2Model):
    dtype = model.param_dtype
  tensors = checkpoint_tensors(folder, SINGLE_FILE)
  abstract = nn.meta.unbox(abstract_params(model))
  sources = _sources(abstract, detect_naming(tensors))
  problems = _config_problems(folder, model.config) if check_config and config is not None else []
  _raise(str(folder), problems + tensor_problems(sources, tensors, str(folder)))

  maps = {}

  def read(names, index, target_dtype):
    src, _ = sources[names]
    return _read_slice(lambda key: tensor_view(tensors[key], maps), src, index, target_dtype)

  return stream_params(abstract, target_shardings(lambda: param_specs(model), abstract, shardings), read, dtype)


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], config, dtype=np.float32):
  """In-memory variant: a {checkpoint key: array (torch layout)} dict (Hub or transformers 5 names) -> a numpy
  parameter tree (validated like :func:`load_hf_dinov2`)."""
  abstract = nn.meta.unbox(abstract_params(_as_model(config)))
  sources = _sources(abstract, detect_naming(state_dict))
  _raise("state dict", tensor_problems(sources, state_dict, "state dict"))

  def build(path, leaf):
    src, _ = sources[key_names(path)]
    return _read_slice(lambda k: np.asarray(state_dict[k]), src, (slice(None),) * len(leaf.shape), np.dtype(dtype))

  return jax.tree_util.tree_map_with_path(build, abstract)


def params_to_state_dict(params, config, naming: str = HUB) -> dict[str, np.ndarray]:
  """The inverse mapping: a parameter tree -> {checkpoint key: numpy array in torch layout}."""
  sources = param_sources(config, naming)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    src, _ = sources[key_names(path)]
    arr = np.asarray(leaf)
    for i, group in enumerate(src.keys):
      a = arr[i] if src.stacked else arr
      if src.perm is not None:
        a = a.transpose(np.argsort(src.perm))
      for k, part in zip(group, np.split(a, len(group), axis=0)):
        out[k] = np.ascontiguousarray(part)
  return out
