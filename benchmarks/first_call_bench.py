"""First-slice latency of VAND: full-context text (before) vs truncated + cached text (after), and a new process.

In one process the backbone is loaded once (load time not counted) and two VAND models are built on it in
turn, each timing its first ``run_volume`` call on one real slice (the middle tumour slice of a real BraTS
2023 case, batch 1), text features included:

- ``before``: the former text path (each state's sentences through ``encode_text`` at the full 77-token
  context), no disk cache;
- ``after, cold cache``: EOT-truncated, batched text encoding (plus the text-tower hash), written to an
  empty disk cache.

Then a second process loads the same backbone and times its first slice with that cache
(``after, warm cache``); it counts text encodings (0 expected). The text-feature time alone is given too.

Usage:
    python benchmarks/first_call_bench.py --backbone random:ViT-L-14-336
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brats2023" / "BraTS-GLI-00002-000"


def _slice():
    import numpy as np

    from napari_clip_ad.io import load_case

    case = load_case(DATA, modalities=["t2w"])
    z = int(np.argmax(case.whole_tumour.sum(axis=(1, 2))))
    return case.images["t2w"][z : z + 1]


def _first_slice(backbone, volume, label: str, counter: dict[str, int], cache: Path | None = None) -> dict[str, object]:
    from napari_clip_ad import build_method, run_volume
    from napari_clip_ad.methods import text_features

    method = build_method("vand", backbone, device="cpu", precision="fp32")
    counter["text_encodes"] = 0
    start = time.perf_counter()
    method.text_features()
    text_s = time.perf_counter() - start
    # The slice below pays the text features again, as a first call does: in-memory features and the
    # tower hash dropped, and (cold row) the disk entry just written removed.
    method._text_cache.clear()
    text_features._TOWER_HASHES.clear()
    for entry in (cache.iterdir() if cache is not None else ()):
        entry.unlink()
    counter["text_encodes"] = 0
    start = time.perf_counter()
    run_volume(volume, method, batch_size=1)
    return {"mode": label, "first_slice_s": round(time.perf_counter() - start, 2), "text_features_s": round(text_s, 2),
            "text_encodes_in_first_slice": counter["text_encodes"]}


def main() -> None:
    """Print one JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="random:ViT-L-14-336")
    parser.add_argument("--warm-child", action="store_true")
    args = parser.parse_args()
    import torch

    from napari_clip_ad.backbones import load_backbone
    from napari_clip_ad.methods import text_features, vand, vand_prompts

    counter = {"text_encodes": 0}
    truncated = text_features.encode_sentences

    def counted(*a, **k):
        counter["text_encodes"] += 1
        return truncated(*a, **k)

    vand_prompts.encode_sentences = counted
    backbone = load_backbone(args.backbone, quick_gelu=False)
    volume = _slice()
    if args.warm_child:
        print(json.dumps(_first_slice(backbone, volume, "after, warm cache (new process)", counter)))
        return
    new_path = vand.encode_state_text

    @torch.no_grad()
    def former(clip, tokenizer, object_name):  # the code before truncation (per state, 77 tokens)
        counter["text_encodes"] += 1
        device = next(clip.parameters()).device
        features = []
        for sentences in vand_prompts.prompt_sentences(object_name):
            embedded = clip.encode_text(tokenizer(sentences).to(device)).float()
            embedded = embedded / embedded.norm(dim=-1, keepdim=True)
            mean = embedded.mean(dim=0)
            features.append(mean / mean.norm())
        return torch.stack(features)

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        os.environ["NAPARI_CLIP_AD_TEXT_CACHE"] = "off"
        vand.encode_state_text = former
        rows.append(_first_slice(backbone, volume, "before", counter))
        vand.encode_state_text = new_path
        os.environ["NAPARI_CLIP_AD_TEXT_CACHE"] = cache
        rows.append(_first_slice(backbone, volume, "after, cold cache", counter, Path(cache)))
        env = {**os.environ, "NAPARI_CLIP_AD_TEXT_CACHE": cache}
        out = subprocess.run([sys.executable, __file__, "--warm-child", "--backbone", args.backbone],
                             env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    before = rows[0]["first_slice_s"]
    print(json.dumps({"backbone": args.backbone, "rows": rows,
                      "first_slice_speedup_cold": round(before / rows[1]["first_slice_s"], 2),
                      "first_slice_speedup_warm": round(before / rows[2]["first_slice_s"], 2),
                      "text_features_speedup_cold": round(rows[0]["text_features_s"] / rows[1]["text_features_s"], 2)}, indent=2))


if __name__ == "__main__":
    main()
