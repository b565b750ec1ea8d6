"""Input-pipeline throughput of ``data.pipeline.make_pipeline`` (decode, crop, flip, batch), img/s
and img/s per core.

    python bench/data_pipeline.py --source=mnist --batches=200
    python bench/data_pipeline.py --source=array_record --num_threads=2 --num_records=512

``mnist``: the embedded 5000 digits (32x32x1). ``array_record``: the script first writes
``--num_records`` 256x256x3 PNG records (smooth colour fields plus noise, ~100-200 KB each, like
photos) in the project's record format to a temp dir, then reads them with ADM centre crop and
random flips at 256. Per core = img/s / min(max(num_threads, 1), cpu cores).
"""

import argparse
import os
import tempfile
import time

import numpy as np

import common
from asymflow_jax.data import pipeline, sources  # noqa: E402


def write_records(path: str, num: int, size: int = 256, seed: int = 0):
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for i in range(num):
    a, b, c = rng.uniform(0.5, 6, 3)
    base = np.stack([np.sin(a * xx + b * yy + c * k) for k in range(3)], -1) * 90 + 128
    img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    writer.write(sources.encode_record(img, i % 1000))
  writer.close()
  return os.path.getsize(path) / num


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--source", default="mnist", choices=("mnist", "array_record"))
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--batches", type=int, default=100, help="timed batches (after one warm-up batch)")
  parser.add_argument("--num_threads", type=int, default=0, help="grain ReadOptions.num_threads (0 = in-line)")
  parser.add_argument("--prefetch", type=int, default=0)
  parser.add_argument("--num_records", type=int, default=512, help="array_record: records to write")
  args = parser.parse_args()

  config = pipeline.default_data_config()
  config.num_threads, config.prefetch = args.num_threads, args.prefetch
  extra = {}
  with tempfile.TemporaryDirectory() as tmp:
    if args.source == "array_record":
      path = os.path.join(tmp, "bench.array_record")
      extra["record_kb"] = write_records(path, args.num_records) / 1024
      config.source, config.path = "array_record", path
      config.image_size, config.num_channels, config.random_flip = 256, 3, True
    pipe = pipeline.make_pipeline(config, seed=0, global_batch_size=args.batch_size, process_index=0,
                                  process_count=1)
    it = iter(pipe)
    next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
    sec = time.perf_counter() - t0
  assert batch["image"].shape[0] == args.batch_size
  ips = args.batches * args.batch_size / sec
  cores = min(max(args.num_threads, 1), os.cpu_count())
  common.emit("data_pipeline", source=args.source, img_per_s=ips, img_per_s_per_core=ips / cores, cores_used=cores,
              num_threads=args.num_threads, prefetch=args.prefetch, batch_size=args.batch_size,
              batches=args.batches, image_shape=list(batch["image"].shape[1:]), **extra)


if __name__ == "__main__":
  main()
