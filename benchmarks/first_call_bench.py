"""First-slice latency of VAND on a new process: full-context text (before) vs truncated + cached text (after).

Three child processes run one after another, each loading the same random-weights backbone (load time
not counted) and timing ``run_volume`` on one real slice (the middle tumour slice of a real BraTS 2023
case, batch 1), text features included:

- ``before``: the former text path (each state's sentences through ``encode_text`` at the full 77-token
  context), no disk cache;
- ``after, cold``: EOT-truncated, batched text encoding, written to an empty disk cache;
- ``after, warm``: a new process with that cache: no text encoding at all (counted).

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


def child(mode: str, backbone: str) -> dict[str, object]:
    """Time the first slice in this process."""
    import numpy as np
    import torch

    from napari_clip_ad import build_method, run_volume
    from napari_clip_ad.io import load_case
    from napari_clip_ad.methods import text_features, vand, vand_prompts

    calls = {"text_encodes": 0}
    if mode == "before":
        @torch.no_grad()
        def former(clip, tokenizer, object_name):  # the code before truncation (per state, 77 tokens)
            device = next(clip.parameters()).device
            features = []
            for sentences in vand_prompts.prompt_sentences(object_name):
                embedded = clip.encode_text(tokenizer(sentences).to(device)).float()
                embedded = embedded / embedded.norm(dim=-1, keepdim=True)
                mean = embedded.mean(dim=0)
                features.append(mean / mean.norm())
            calls["text_encodes"] += 1
            return torch.stack(features)

        vand.encode_state_text = former
    else:
        original = text_features.encode_sentences

        def counted(*args, **kwargs):
            calls["text_encodes"] += 1
            return original(*args, **kwargs)

        vand_prompts.encode_sentences = counted
    case = load_case(DATA, modalities=["t2w"])
    z = int(np.argmax(case.whole_tumour.sum(axis=(1, 2))))
    method = build_method("vand", backbone, device="cpu", precision="fp32")
    start = time.perf_counter()
    run_volume(case.images["t2w"][z : z + 1], method, batch_size=1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    run_volume(case.images["t2w"][z : z + 1], method, batch_size=1)
    second = time.perf_counter() - start
    return {"mode": mode, "first_slice_s": round(first, 2), "next_slice_s": round(second, 2), **calls}


def main() -> None:
    """Run the three children and print one JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="random:ViT-L-14-336")
    parser.add_argument("--child", choices=("before", "after"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.backbone)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for mode, env_cache in (("before", "off"), ("after", cache), ("after", cache)):
            env = {**os.environ, "NAPARI_CLIP_AD_TEXT_CACHE": env_cache}
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--backbone", args.backbone],
                                 env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    rows[1]["mode"], rows[2]["mode"] = "after, cold cache", "after, warm cache (new process)"
    before = rows[0]["first_slice_s"]
    print(json.dumps({"backbone": args.backbone, "rows": rows,
                      "first_slice_speedup_cold": round(before / rows[1]["first_slice_s"], 2),
                      "first_slice_speedup_warm": round(before / rows[2]["first_slice_s"], 2)}, indent=2))


if __name__ == "__main__":
    main()
