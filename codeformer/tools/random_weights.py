"""Random weights in the exact file formats of the three official releases.

Every tensor is derived from its state-dict key alone (a generator seeded by the CRC32 of
``"{seed}/{file}/{key}"``), so the bytes depend only on the key manifests in
``codeformer/tools/manifests/``: the same files as ``shared/reference/random_weights.py`` writes,
which the golden parity outputs were produced with. Tests, benchmarks and the local server
use them because the real release files cannot be downloaded everywhere.

    python -m codeformer.tools.random_weights OUT_DIR [--seed 0] [--face-bias -1]

The detector is shaped so that it finds faces: random weights would score every anchor
near 0.5, under the 0.8 threshold. The face logit of every anchor is -1000 except on the
larger anchor of the stride-16 head, whose heads are scaled so that boxes come out about
1600 px square with the five landmarks on the FFHQ template of a 256 px face.
"""

from __future__ import annotations

import argparse
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"

# file name -> (manifest, container): how each official release file is laid out
FILES: dict[str, tuple[str, str | None]] = {
    "codeformer.pth": ("state_dict_keys_codeformer.txt", "params_ema"),
    "detection_Resnet50_Final.pth": ("state_dict_keys_retinaface.txt", "module."),
    "parsing_parsenet.pth": ("state_dict_keys_parsenet.txt", None),
}

# Detector shaping: level 1 (stride 16, 128 px prior), anchor 1 fires.
FIRING_HEAD = "ClassHead.1.conv1x1.bias"  # channels [a0_bg, a0_face, a1_bg, a1_face]
FACES_LEVEL = 1
CLASS_GAIN, BOX_GAIN, LANDMARK_GAIN = 0.15, 0.003, 0.01
PRIOR_PX, BOX_PX, FACE_EXTENT_PX = 128.0, 1600.0, 256.0
VARIANCES = (0.1, 0.2)
FFHQ_TEMPLATE_512 = (
    (192.98138, 239.94708),
    (318.90277, 240.1936),
    (256.63416, 314.01935),
    (201.26117, 371.41043),
    (313.08905, 371.15118),
)


def read_manifest(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) pairs of a manifest file, in module order."""
    entries = []
    for line in (MANIFEST_DIR / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split(" ", 1)
        dims = shape.strip("() ").replace(",", " ").split()
        entries.append((key, tuple(int(d) for d in dims)))
    return entries


def _tensor_for(key: str, shape: tuple[int, ...], seed: int, file: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{file}/{key}".encode()))
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return torch.tensor(0, dtype=torch.long)
    if leaf == "running_mean":
        return torch.zeros(shape)
    if leaf == "running_var":
        return torch.ones(shape)
    noise = torch.randn(shape, generator=generator)
    if len(shape) == 1:
        # 1-D weights are norm scales (BatchNorm, GroupNorm, LayerNorm); the rest are biases
        return 1.0 + 0.02 * noise if leaf == "weight" else 0.02 * noise
    fan_in = 1
    for dim in shape[1:]:
        fan_in *= dim
    return noise / fan_in**0.5


def _shape_detector(sd: OrderedDict, face_bias: float) -> None:
    for key in [k for k in sd if k.startswith("ClassHead.") and k.endswith(".bias")]:
        bias = torch.zeros(4)
        bias[1::2] = -1000.0  # face logits off
        if key == FIRING_HEAD:
            bias[3] = face_bias
        sd[key] = bias
    level = FACES_LEVEL
    sd[f"ClassHead.{level}.conv1x1.weight"][2:4] *= CLASS_GAIN
    sd[f"BboxHead.{level}.conv1x1.weight"][4:8] *= BOX_GAIN
    log_size = float(torch.log(torch.tensor(BOX_PX / PRIOR_PX, dtype=torch.float64))) / VARIANCES[1]
    sd[f"BboxHead.{level}.conv1x1.bias"][4:8] = torch.tensor([0.0, 0.0, log_size, log_size])
    sd[f"LandmarkHead.{level}.conv1x1.weight"][10:20] *= LANDMARK_GAIN
    template = torch.tensor(FFHQ_TEMPLATE_512, dtype=torch.float64).reshape(-1)
    sd[f"LandmarkHead.{level}.conv1x1.bias"][10:20] = (
        (template - 256.0) / 512.0 * FACE_EXTENT_PX / (VARIANCES[0] * PRIOR_PX)
    ).float()


def state_dict(file: str, seed: int = 0, face_bias: float = -1.0) -> OrderedDict:
    """The bare state dict (no container, no prefix) that ``file`` would hold."""
    manifest, _ = FILES[file]
    sd = OrderedDict((key, _tensor_for(key, shape, seed, file)) for key, shape in read_manifest(manifest))
    if file.startswith("detection"):
        _shape_detector(sd, face_bias)
    return sd


def file_object(file: str, seed: int = 0, face_bias: float = -1.0) -> dict:
    """What ``torch.save`` writes for ``file``, in the official container format."""
    _, container = FILES[file]
    sd = state_dict(file, seed, face_bias)
    if container == "params_ema":
        return {"params_ema": sd}
    if container == "module.":
        return OrderedDict(("module." + key, value) for key, value in sd.items())
    return sd


def write(out: Path, seed: int = 0, face_bias: float = -1.0) -> list[Path]:
    """Write the three files into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for file in FILES:
        torch.save(file_object(file, seed, face_bias), out / file)
        paths.append(out / file)
    return paths


def written(out: Path, seed: int = 0) -> Path:
    """``out`` once ``write`` has filled it: a weights folder for ``CODEFORMER_WEIGHTS_DIR``."""
    write(out, seed)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--face-bias", type=float, default=-1.0, help="face logit bias of the firing anchor")
    args = parser.parse_args()
    write(args.out, args.seed, args.face_bias)


if __name__ == "__main__":
    main()
