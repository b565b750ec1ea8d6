r"""Subspace tools: patch PCA, random subspaces, Procrustes alignment, and the subspace file.

A subspace is an orthonormal basis U of shape (D, r) over patch tokens of dimension D = p*p*C
(spec section 7). Conventions follow the reference tools:

* PCA: images in [0, 1] are mapped to x = 2 img - 1, cut into DiT-packed tokens, and the
  **uncentred, unnormalised** Gram G = sum_tokens t^T t is accumulated in float64 on the host
  (each batch's Gram is a jitted float32 matmul at HIGHEST precision, then added in float64, so
  there is no drift across batches). U = the top-r eigenvectors of G, stored in **ascending**
  eigenvalue order (last column = top direction), exactly like the reference ``proj_mat``.
* Procrustes: latent tokens z (d-dim) and pixel tokens x (D-dim), both channel-first packed; with
  M = sum z^T x = A S B^T (SVD), U = B A^T (D x d) and s = sqrt(tr(U^T G_pix U) / sum |z|^2).
* Compare subspaces through the projector U U^T (signs and rotations inside degenerate
  eigenspaces are free).

Command line (``asymflow_jax/subspace/__main__.py``)::

  python -m asymflow_jax.subspace pca --images mnist --patch-size 4 --rank 8 --out subspace.npz
  python -m asymflow_jax.subspace random --patch-size 16 --channels 3 --rank 8 --out random.npz
  python -m asymflow_jax.subspace procrustes --images imgs.npz --latents lat.npz \
      --patch-size 16 --latent-patch-size 2 --out lifted.npz
  python -m asymflow_jax.subspace info subspace.npz
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Iterable, Iterator

import numpy as np

import jax
import jax.numpy as jnp

from asymflow_jax import asymflow
from asymflow_jax.data import sources

PACKINGS = ("dit", "channel_first")


# ----------------------------------------------------------------------------- the subspace file


@dataclasses.dataclass(frozen=True)
class Subspace:
  """An orthonormal patch basis with its metadata.

  Attributes:
    basis: (D, r) float32, orthonormal columns.
    patch_size: p, with D = p*p*channels.
    scale: s (1 for PCA/random; the Procrustes scale for a latent lift).
    packing: token order of the rows, "dit" ((py, px, c)) or "channel_first" ((c, py, px)).
    eigenvalues: optional (D,) float64 spectrum (ascending) of the Gram it came from.
    provenance: JSON-serialisable dict: how it was made.
  """

  basis: np.ndarray
  patch_size: int
  scale: float = 1.0
  packing: str = "dit"
  eigenvalues: np.ndarray | None = None
  provenance: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    basis = np.asarray(self.basis, np.float32)
    asymflow.check_basis(basis)
    d = basis.shape[0]
    p = int(self.patch_size)
    if p != self.patch_size:
      raise ValueError(f"patch_size must be an integer, got {self.patch_size!r}.")
    if p < 1 or d % (p * p):
      raise ValueError(f"basis dimension D={d} is not p*p*C for patch_size={self.patch_size}.")
    if self.packing not in PACKINGS:
      raise ValueError(f"packing must be one of {PACKINGS}, got {self.packing!r}.")
    asymflow.check_scale(float(self.scale))
    object.__setattr__(self, "basis", basis)
    object.__setattr__(self, "patch_size", p)
    object.__setattr__(self, "scale", float(self.scale))

  @property
  def dim(self) -> int:
    return self.basis.shape[0]

  @property
  def rank(self) -> int:
    return self.basis.shape[1]

  @property
  def channels(self) -> int:
    return self.dim // (self.patch_size ** 2)

  def projector(self) -> np.ndarray:
    """U U^T in float64 (D, D); for tests and comparisons, never for the hot path."""
    u = self.basis.astype(np.float64)
    return u @ u.T

  def with_packing(self, packing: str) -> "Subspace":
    """The same subspace with rows re-ordered to another token packing."""
    if packing == self.packing:
      return self
    perm = packing_permutation(self.patch_size, self.channels, self.packing, packing)
    return dataclasses.replace(self, basis=self.basis[perm], packing=packing)

  def save(self, path: str) -> None:
    """Writes an .npz with basis, rank, patch_size, scale, packing, eigenvalues and provenance."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = dict(basis=self.basis, rank=np.int64(self.rank), patch_size=np.int64(self.patch_size),
                  scale=np.float32(self.scale), packing=np.str_(self.packing),
                  provenance=np.str_(json.dumps(self.provenance, sort_keys=True)))
    if self.eigenvalues is not None:
      arrays["eigenvalues"] = np.asarray(self.eigenvalues, np.float64)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # never leave a half-written subspace file behind

  @classmethod
  def load(cls, path: str) -> "Subspace":
    """Reads a file written by :meth:`save`, validating it."""
    if not os.path.exists(path):
      raise FileNotFoundError(f"subspace file {path!r} does not exist.")
    with np.load(path, allow_pickle=False) as f:
      missing = {"basis", "rank", "patch_size", "scale"} - set(f.files)
      if missing:
        raise ValueError(f"subspace file {path!r} lacks the arrays {sorted(missing)}; found {sorted(f.files)}.")
      basis = f["basis"]
      if basis.ndim != 2 or int(f["rank"]) != basis.shape[1]:
        raise ValueError(f"subspace file {path!r}: rank={int(f['rank'])} but basis has shape {basis.shape}.")
      return cls(basis=basis, patch_size=int(f["patch_size"]), scale=float(f["scale"]),
                 packing=str(f["packing"]) if "packing" in f.files else "dit",
                 eigenvalues=f["eigenvalues"] if "eigenvalues" in f.files else None,
                 provenance=json.loads(str(f["provenance"])) if "provenance" in f.files else {})


def packing_permutation(p: int, c: int, src: str, dst: str) -> np.ndarray:
  """Index array ``perm`` with ``tokens_dst = tokens_src[..., perm]`` between two packings."""
  for name in (src, dst):
    if name not in PACKINGS:
      raise ValueError(f"packing must be one of {PACKINGS}, got {name!r}.")
  ids = np.arange(p * p * c).reshape(1, p, p, c)
  src_order = np.asarray(asymflow.patchify(ids, p, channel_first=src == "channel_first"))[0, 0]
  dst_order = np.asarray(asymflow.patchify(ids, p, channel_first=dst == "channel_first"))[0, 0]
  position = np.argsort(src_order)  # position[id] = index of pixel id in src
  return position[dst_order]


# ------------------------------------------------------------------------------------ streaming


@jax.jit
def _token_gram(tokens):
  """(n, D) float32 -> (D, D) Gram at full float32 precision."""
  return jnp.matmul(tokens.T, tokens, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def _cross_gram(a, b):
  return jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST)


def _tokens(images, p, channel_first):
  t = asymflow.patchify(jnp.asarray(images, jnp.float32), p, channel_first=channel_first)
  return t.reshape(-1, t.shape[-1])


def patch_gram(batches: Iterable[np.ndarray], patch_size: int, *, channel_first: bool = False,
               float64: bool = False, progress: bool = False) -> tuple[np.ndarray, int]:
  """Uncentred patch Gram sum_t t^T t over an iterator of NHWC image batches in model space.

  Each batch is one jitted float32 matmul on the device (HIGHEST precision), or with
  ``float64=True`` a float64 numpy matmul on the host (bit-for-bit the reference recipe, slower);
  batches are always summed in float64 on the host, so nothing drifts across batches.
  Returns (gram (D, D) float64, number of tokens).
  """
  gram, count = None, 0
  for images in _maybe_progress(batches, progress, "gram"):
    tokens = _tokens(images, patch_size, channel_first)
    if float64:
      t64 = np.asarray(tokens, np.float64)
      g = t64.T @ t64
    else:
      g = np.asarray(_token_gram(tokens), np.float64)
    gram = g if gram is None else gram + g
    count += tokens.shape[0]
  if gram is None:
    raise ValueError("patch_gram got no image batches; the image iterator was empty.")
  return gram, count


def top_eigenvectors(gram: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
  """Top-``rank`` eigenvectors of a symmetric PSD matrix, ascending order (last = top).

  Returns (basis (D, rank) float32, all eigenvalues ascending (D,) float64).
  """
  gram = np.asarray(gram, np.float64)
  d = gram.shape[0]
  if gram.shape != (d, d):
    raise ValueError(f"gram must be square, got shape {gram.shape}.")
  _check_rank(rank, d)
  evals, evecs = np.linalg.eigh(gram)
  return evecs[:, d - rank:].astype(np.float32), evals


def pca_subspace(batches: Iterable[np.ndarray], patch_size: int, rank: int, *, float64: bool = False,
                 progress: bool = False, provenance: dict | None = None) -> Subspace:
  """PCA subspace of DiT-packed patches of NHWC batches in model space ([-1, 1])."""
  gram, count = patch_gram(batches, patch_size, float64=float64, progress=progress)
  _check_rank(rank, gram.shape[0])
  basis, evals = top_eigenvectors(gram, rank)
  prov = dict(method="pca", num_tokens=count, **(provenance or {}))
  return Subspace(basis=basis, patch_size=patch_size, eigenvalues=evals, provenance=prov)


def random_subspace(dim: int, rank: int, *, seed: int, patch_size: int | None = None) -> Subspace | np.ndarray:
  """A Haar-random rank-``rank`` orthonormal basis of R^dim (the paper's random-subspace ablation).

  QR of a Gaussian matrix with the signs of R's diagonal folded into Q. Returns a Subspace if
  ``patch_size`` is given, else the (dim, rank) float32 array.
  """
  _check_rank(rank, dim)
  g = np.random.default_rng(seed).standard_normal((dim, rank))
  q, r = np.linalg.qr(g)
  q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
  basis = q.astype(np.float32)
  if patch_size is None:
    return basis
  return Subspace(basis=basis, patch_size=patch_size, provenance=dict(method="random", seed=seed))


@dataclasses.dataclass
class ProcrustesStats:
  """Streaming sums for Procrustes: cross (d, D), pixel_gram (D, D), latent_norm_sq."""

  cross: np.ndarray | None = None
  pixel_gram: np.ndarray | None = None
  latent_norm_sq: float = 0.0
  count: int = 0

  def update(self, latent_tokens, pixel_tokens) -> "ProcrustesStats":
    """Adds paired tokens (n, d) and (n, D) (row i of each from the same patch)."""
    latent_tokens = jnp.asarray(latent_tokens, jnp.float32)
    pixel_tokens = jnp.asarray(pixel_tokens, jnp.float32)
    if latent_tokens.ndim != 2 or pixel_tokens.ndim != 2 or latent_tokens.shape[0] != pixel_tokens.shape[0]:
      raise ValueError(
          f"latent and pixel tokens must be paired (n, d) and (n, D) arrays, got shapes "
          f"{tuple(latent_tokens.shape)} and {tuple(pixel_tokens.shape)}.")
    if latent_tokens.shape[1] > pixel_tokens.shape[1]:
      raise ValueError(f"latent dimension d={latent_tokens.shape[1]} exceeds pixel dimension "
                       f"D={pixel_tokens.shape[1]}; expected d <= D.")
    cross = np.asarray(_cross_gram(latent_tokens, pixel_tokens), np.float64)
    gram = np.asarray(_token_gram(pixel_tokens), np.float64)
    self.cross = cross if self.cross is None else self.cross + cross
    self.pixel_gram = gram if self.pixel_gram is None else self.pixel_gram + gram
    self.latent_norm_sq += float(np.sum(np.square(np.asarray(latent_tokens, np.float64))))
    self.count += latent_tokens.shape[0]
    return self


def procrustes_basis(cross: np.ndarray, pixel_gram: np.ndarray, latent_norm_sq: float) -> tuple[np.ndarray, float]:
  """Orthonormal U (D, d) = B A^T from the SVD cross = A S B^T, and the scale s."""
  cross = np.asarray(cross, np.float64)
  d, big_d = cross.shape
  if pixel_gram.shape != (big_d, big_d):
    raise ValueError(f"pixel_gram must have shape ({big_d}, {big_d}), got {pixel_gram.shape}.")
  a, _, bt = np.linalg.svd(cross, full_matrices=False)
  u = bt[:d].T @ a[:, :d].T
  if not latent_norm_sq > 1e-12:
    raise ValueError(f"the latents have no energy (sum of |z|^2 = {latent_norm_sq!r}): the Procrustes scale "
                     "||U^T x|| / ||z|| is undefined; check the latents passed in.")
  energy = np.trace(u.T @ pixel_gram @ u)
  scale = float(np.sqrt(max(energy / latent_norm_sq, 1e-12)))
  return u.astype(np.float32), scale


def procrustes_subspace(pairs: Iterable[tuple[np.ndarray, np.ndarray]], patch_size: int, latent_patch_size: int,
                        *, progress: bool = False, provenance: dict | None = None) -> Subspace:
  """Procrustes alignment from pairs (pixel images NHWC in model space, latents NHWC).

  Both are channel-first packed; pixel grid = latent grid. The result keeps the channel-first
  row order (``packing="channel_first"``); use ``with_packing("dit")`` for a DiT-packed model.
  """
  stats = ProcrustesStats()
  for images, latents in _maybe_progress(pairs, progress, "procrustes"):
    pix = _tokens(images, patch_size, True)
    lat = _tokens(latents, latent_patch_size, True)
    if pix.shape[0] != lat.shape[0]:
      raise ValueError(
          f"pixel grid {images.shape[1] // patch_size}x{images.shape[2] // patch_size} (images {images.shape[1:3]}, "
          f"patch {patch_size}) != latent grid {latents.shape[1] // latent_patch_size}x"
          f"{latents.shape[2] // latent_patch_size} (latents {latents.shape[1:3]}, patch {latent_patch_size}).")
    stats.update(lat, pix)
  if stats.cross is None:
    raise ValueError("procrustes_subspace got no (images, latents) pairs.")
  basis, scale = procrustes_basis(stats.cross, stats.pixel_gram, stats.latent_norm_sq)
  prov = dict(method="procrustes", num_tokens=stats.count, latent_patch_size=latent_patch_size, **(provenance or {}))
  return Subspace(basis=basis, patch_size=patch_size, scale=scale, packing="channel_first", provenance=prov)


def _check_rank(rank, dim):
  if not isinstance(rank, (int, np.integer)) or not 0 <= rank <= dim:
    raise ValueError(f"rank must be an integer in [0, D={dim}], got {rank!r}.")


def _maybe_progress(it, progress, desc):
  if not progress:
    return it
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(it, desc=desc, unit="batch", file=sys.stderr)


# ------------------------------------------------------------------------------------ image input


def load_image_array(path: str, key: str | None = None) -> np.ndarray:
  """Loads images as float32 NHWC in [0, 1] from an .npy/.npz file or the embedded ``mnist`` set.

  Arrays of dtype uint8 are divided by 255; float arrays must already lie in [0, 1]. NCHW arrays
  (channel axis of size 1, 3 or 4 in position 1 and not last) are transposed to NHWC.
  """
  if path == "mnist":  # the embedded default: 5000 digits, zero-padded to 32x32, one channel
    src = sources.MnistSource(pad_to=32, num_channels=1)
    return np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32) / 255.0
  if not os.path.exists(path):
    raise FileNotFoundError(f"image file {path!r} does not exist (expected .npy, .npz or 'mnist').")
  if path.endswith(".npz"):
    with np.load(path) as f:
      name = key or ("images" if "images" in f.files else f.files[0])
      if name not in f.files:
        raise ValueError(f"{path!r} has no array {name!r}; it has {f.files}.")
      arr = f[name]
  else:
    arr = np.load(path)
  if arr.ndim == 3:
    arr = arr[..., None]
  if arr.ndim != 4:
    raise ValueError(f"images in {path!r} must be a 4-D array, got shape {arr.shape}.")
  if arr.shape[1] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
    arr = arr.transpose(0, 2, 3, 1)
  if arr.dtype == np.uint8:
    return arr.astype(np.float32) / 255.0
  arr = arr.astype(np.float32)
  if not np.isfinite(arr).all():
    raise ValueError(f"float images in {path!r} hold {int(np.sum(~np.isfinite(arr)))} non-finite values (NaN or "
                     "inf); expected values in [0, 1].")
  if arr.min() < 0 or arr.max() > 1:
    raise ValueError(f"float images in {path!r} must lie in [0, 1], got range [{arr.min():.3g}, {arr.max():.3g}].")
  return arr


def iterate_batches(arrays: np.ndarray, batch_size: int, *, num: int | None = None, seed: int | None = None) -> Iterator:
  """Yields model-space batches (2 img - 1) of ``num`` images (a seeded random subset if seed given)."""
  n = arrays.shape[0] if num is None else min(num, arrays.shape[0])
  idx = np.arange(arrays.shape[0])
  if seed is not None:
    idx = np.random.default_rng(seed).permutation(arrays.shape[0])
  idx = np.sort(idx[:n])
  for start in range(0, n, batch_size):
    yield arrays[idx[start:start + batch_size]] * 2.0 - 1.0
