"""MVFA-AD training step: time of the frozen stem (what the cache saves) vs adapters + loss + backward.

MVFA-AD's adapters sit in the residual stream, so the feature cache can hold only the stream up to the
first tapped block; every later block runs (forward and backward) at every step. This script splits one
step into those two parts on the same model, interleaved over rounds (best round kept), with the text
features computed beforehand (a one-time cost that ``train_bench.py``'s first epoch includes).

Usage:
    python benchmarks/mvfa_step_bench.py --backbone random:ViT-B-16
Random weights (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from napari_clip_ad import build_method
from napari_clip_ad.train.losses import method_loss


def main() -> None:
    """Print one JSON object: stem seconds, head seconds, step speed-up from caching the stem."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="random:ViT-B-16")
    parser.add_argument("--image-size", type=int, default=240)
    parser.add_argument("--batch-size", type=int, default=1, help="official train_zero.py: 1")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    method = build_method("mvfa", args.backbone, image_size=args.image_size, device="cpu")
    for part in method.trainable_parts().values():
        part.requires_grad_(True)
    method.text_features()
    size = args.image_size
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(args.batch_size, size, size)
    masks[:, size // 3 : size // 2, size // 3 : size // 2] = 1
    stem_s, head_s = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        stem = method.tap_tokens(images)
        stem_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        method_loss(method.head_details(stem), masks, "mvfa").backward()
        head_s.append(time.perf_counter() - start)
    stem, head = min(stem_s), min(head_s)
    print(json.dumps({"backbone": args.backbone, "layers": method.layers, "threads": torch.get_num_threads(),
                      "stem_s": stem, "head_loss_backward_s": head, "step_speedup_from_cache": (stem + head) / head}, indent=2))


if __name__ == "__main__":
    main()
