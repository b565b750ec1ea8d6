r"""Writes an ArrayRecord file from a folder of images.

Usage::

    python -m asymflow_jax.data.prep --images DIR --out FILE.array_record \
        [--labels-from-subdirs] [--size 64] [--channels 3] [--skip-bad]

With ``--labels-from-subdirs`` the label of an image is the index of its
top-level sub-directory in sorted order (class names are written to
``FILE.array_record.json``); otherwise every label is 0. With ``--size`` each
image is ADM centre-cropped/resized to ``size x size`` before storing; without
it images are stored at their original size (the pipeline crops at read time).
Each record is an asymflow record (header + PNG, see ``sources.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

from asymflow_jax.data import sources



def list_images(images_dir: str, labels_from_subdirs: bool = False
                ) -> tuple[list[tuple[str, int]], list[str]]:
  """Returns ([(path, label)], class_names), sorted deterministically."""
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f"image folder not found: {images_dir}")
  if labels_from_subdirs:
    class_names = sorted(d for d in os.listdir(images_dir)
                         if os.path.isdir(os.path.join(images_dir, d)))
    if not class_names:
      raise ValueError(f"--labels-from-subdirs: no sub-directories in {images_dir}")
    roots = [(os.path.join(images_dir, d), i) for i, d in enumerate(class_names)]
  else:
    class_names, roots = [], [(images_dir, 0)]
  items = []
  for root, label in roots:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      found.extend(os.path.join(dirpath, f) for f in filenames
                   if f.lower().endswith(sources.IMAGE_EXTENSIONS))
    items.extend((p, label) for p in sorted(found))
  if not items:
    raise ValueError(f"no images ({', '.join(sources.IMAGE_EXTENSIONS)}) found under {images_dir}")
  return items, class_names


def load_image(path: str, num_channels: int = 3, size: int | None = None) -> np.ndarray:
  """Reads an image file as uint8 [H, W, C]; raises ValueError naming the file."""
  try:
    with Image.open(path) as img:
      img = img.convert({1: "L", 3: "RGB"}[num_channels])
      image = np.asarray(img)
  except Exception as e:
    raise ValueError(f"cannot read image {path}: {e}") from e
  if image.ndim == 2:
    image = image[:, :, None]
  if size is not None:
    image = sources.center_crop_arr(image, size)
  return image


def prepare_array_record(images_dir: str, out: str, *, labels_from_subdirs: bool = False,
                         size: int | None = None, num_channels: int = 3,
                         skip_bad: bool = False, progress: bool = True) -> dict:
  """Function form of the CLI. Returns a summary dict (also written to ``out + '.json'``)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  if num_channels not in (1, 3):
    raise ValueError(f"num_channels must be 1 or 3, got {num_channels}")
  items, class_names = list_images(images_dir, labels_from_subdirs)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = out + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  written, skipped = 0, []
  try:
    for path, label in tqdm.tqdm(items, desc=f"writing {os.path.basename(out)}",
                                 unit="img", disable=not progress):
      try:
        image = load_image(path, num_channels, size)
      except ValueError as e:
        if not skip_bad:
          raise ValueError(f"{e} (use --skip-bad / skip_bad=True to skip it)") from e
        skipped.append(str(e))
        continue
      writer.write(sources.encode_record(image, label))
      written += 1
  except BaseException:
    writer.close()
    os.remove(tmp)
    raise
  writer.close()
  if written == 0:
    os.remove(tmp)
    raise ValueError(f"no readable images under {images_dir}")
  os.replace(tmp, out)
  summary = {"num_records": written, "num_skipped": len(skipped), "skipped": skipped,
             "class_names": class_names, "size": size, "num_channels": num_channels}
  with open(out + ".json", "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m asymflow_jax.data.prep",
      description="Write an ArrayRecord file from a folder of images.")
  parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
  parser.add_argument("--out", required=True, help="output .array_record file")
  parser.add_argument("--labels-from-subdirs", action="store_true",
                      help="label = index of the sorted top-level sub-directory")
  parser.add_argument("--size", type=int, default=None,
                      help="ADM centre crop/resize to SIZE x SIZE (default: keep size)")
  parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
  parser.add_argument("--skip-bad", action="store_true",
                      help="skip unreadable images (counted) instead of failing")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  try:
    summary = prepare_array_record(
        args.images, args.out, labels_from_subdirs=args.labels_from_subdirs, size=args.size,
        num_channels=args.channels, skip_bad=args.skip_bad, progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {summary['num_records']} records to {args.out} "
        f"({summary['num_skipped']} skipped, {len(summary['class_names']) or 1} classes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
