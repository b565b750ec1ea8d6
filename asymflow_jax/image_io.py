"""Images in and out: [-1, 1] floats <-> uint8, grids, PNG files (any ``etils.epath`` path, e.g. gs://)."""

from __future__ import annotations

import io

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 [0, 255] (round half to even after scaling).

  Raises FloatingPointError on NaN/Inf instead of writing black pixels.
  """
  images = np.asarray(images, np.float32)
  if not np.isfinite(images).all():
    bad = int(np.sum(~np.isfinite(images).reshape(images.shape[0], -1).all(axis=1))) if images.ndim else 1
    raise FloatingPointError(f"{bad} of {images.shape[0] if images.ndim else 1} images contain NaN or Inf "
                             "values; refusing to write them as pixels.")
  return np.asarray(np.clip(np.round((images + 1.0) * 127.5), 0, 255), np.uint8)


def image_grid(images_uint8: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """(B, H, W, C) uint8 -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, C) grid on white."""
  b, h, w, c = images_uint8.shape
  cols = cols or int(np.ceil(np.sqrt(b)))
  rows = int(np.ceil(b / cols))
  grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, np.uint8)
  for i in range(b):
    r, q = divmod(i, cols)
    grid[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = images_uint8[i]
  return grid


def save_png(path, images_uint8: np.ndarray, cols: int | None = None, upscale: int = 1):
  """Writes a grid of uint8 images (B, H, W, C) as one PNG (parent folders are created)."""
  grid = image_grid(images_uint8, cols)
  img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())


def save_npz(path, **arrays):
  """``np.savez`` to any epath path."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buf.getvalue())
