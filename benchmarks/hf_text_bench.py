"""BiomedCLIP text tower: features cut after the last real token vs open_clip's full 256-token ``encode_text``.

A PubMedBERT-base-sized ``HFTextEncoder`` (BertConfig with BiomedBERT's sizes: vocab 30522, width 768,
12 layers, 12 heads, MLP 3072; random weights, nothing downloaded) with BiomedCLIP's [CLS] pooler, MLP
projection and context 256. The sentences are VAND's prompt ensemble for "brain" (the longest text
workload of a fixed-prompt method; its first ``--sentences`` of each side, to keep the full run short on a
CPU), tokenised by the tiny test vocabulary, which splits words into more pieces than PubMedBERT's, so
the real cut is at most this long. Prints both times, their ratio and the largest feature difference.
Usage: ``python benchmarks/hf_text_bench.py [--sentences 8] [--repeats 2]``.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    import open_clip
    from open_clip.hf_model import HFTextEncoder
    from transformers import BertConfig

    from napari_clip_ad.backbones.biomedclip import register_tiny_biomedclip
    from napari_clip_ad.backbones.hf_text import encode_hf_text
    from napari_clip_ad.methods.vand_prompts import prompt_sentences

    register_tiny_biomedclip()
    tokenizer = open_clip.get_tokenizer("tiny-biomedclip")
    normal, abnormal = prompt_sentences("brain")
    tokens = tokenizer(normal[: args.sentences] + abnormal[: args.sentences])
    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    text = HFTextEncoder("bert", 512, config=config, pooler_type="cls_last_hidden_state_pooler", proj_type="mlp").eval()
    holder = torch.nn.Module()
    holder.text = text

    def timed(fn):  # noqa: ANN001, ANN202
        best, out = float("inf"), None
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                out = fn()
            best = min(best, time.perf_counter() - start)
        return best, out

    full_s, full = timed(lambda: text(tokens))
    cut_s, cut = timed(lambda: encode_hf_text(holder, tokens))
    used = int((tokens != 0).any(dim=0).nonzero().max()) + 1
    print(f"sentences {tokens.shape[0]}, context {tokens.shape[1]}, cut after token {used}; threads {torch.get_num_threads()}")
    print(f"full encode_text {full_s:.3f} s, cut {cut_s:.3f} s, speed-up {full_s / cut_s:.1f}x, "
          f"max |difference| {float((full - cut).abs().max()):.2e}")


if __name__ == "__main__":
    main()
