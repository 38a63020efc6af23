"""LLaVA-NeXT-shaped benchmark: LM prefill wall time of FasterVLM and SparseVLM on one anyres
image of 2928 visual tokens, relative to the unpruned model, measured side by side in one run
(configurations interleaved round-robin, median of the repeats), next to the FLOPs ratio of
each run's accounting (docs/accounting.md: decoder layers only).

    python benchmarks/bench_next.py [--layers 17 --hidden 1024 --repeats 3 --threads 1]

The model is a random LlavaNextForConditionalGeneration built in code: CLIP 336/14 tiles of
small width on LLaVA-v1.6's grid pinpoints, and a Llama deep enough for SparseVLM's pruning
layers 2/6/15. The image is 672x672: the base tile plus a 2x2 grid, 576 + 48 x 49 = 2928
visual tokens (the papers' "2880" = 5 x 576 counts neither the newlines nor unpadding).

FasterVLM runs at 75/90/95% reduction per tile (k = 144/58/29 of each tile's 576, newlines
kept). SparseVLM's NeXT settings "640/320/160 of 2880" are v1.5 budgets 128/64/32 scaled by
2880/576; the toolkit scales a v1.5 schedule by N/576 (docs/llava-next.md), and v1.5 has
schedules for budgets 192/128/96/64 only, so this runs budgets 128, 96 and 64 (equal tokens
about 650, 490 and 325 of 2928 at 32 layers) and not 32; the table prints each run's kept
counts per pruning layer.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sparsevlm.methods import SparseLlava, SparseVLMConfig
from sparsevlm.methods.demo_model import separate_decisions

IMAGE_TOKEN, PAD, BOS = 4, 3, 1
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-v1.6's
IMAGE_SIZE = (672, 672)

CONFIGS = [
    ("unpruned", SparseVLMConfig(method="none")),
    ("FasterVLM 75%", SparseVLMConfig(method="fastervlm", reduction=0.75)),
    ("FasterVLM 90%", SparseVLMConfig(method="fastervlm", reduction=0.90)),
    ("FasterVLM 95%", SparseVLMConfig(method="fastervlm", reduction=0.95)),
    ("SparseVLM v1.5 128", SparseVLMConfig(method="sparsevlm", budget=128)),
    ("SparseVLM v1.5 96", SparseVLMConfig(method="sparsevlm", budget=96)),
    ("SparseVLM v1.5 64", SparseVLMConfig(method="sparsevlm", budget=64)),
]


def build_model(layers: int, hidden: int, intermediate: int, heads: int, vision_hidden: int, seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=3, num_attention_heads=2)
    text = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=8192,
                       pad_token_id=PAD, tie_word_embeddings=False)
    config = LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
                             image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                             vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    separate_decisions(model, seed)
    with torch.no_grad():
        model.model.image_newline.normal_()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=17, help="decoder layers (>= 17: SparseVLM prunes at 2/6/15)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vision-hidden", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=35, help="prompt tokens before the image")
    parser.add_argument("--text", type=int, default=40, help="prompt tokens after the image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sparsevlm.methods.anyres import layout_for
    from sparsevlm.methods.inputs import CLIP_MEAN, CLIP_STD

    model = build_model(args.layers, args.hidden, args.intermediate, args.heads, args.vision_hidden)
    vlms = [(name, SparseLlava(model, config)) for name, config in CONFIGS]
    layout = layout_for(vlms[0][1].spec, IMAGE_SIZE)
    gen = torch.Generator().manual_seed(0)
    words = lambda n: torch.randint(10, 500, (n,), generator=gen).tolist()
    # the prompt with the image expanded to its visual tokens, as the processor gives it
    ids = [[BOS] + words(args.prefix - 1) + [IMAGE_TOKEN] * layout.count + words(args.text)]
    pixels = (torch.rand(1, layout.tiles, 3, 336, 336, generator=torch.Generator().manual_seed(1))
              - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    sizes = [IMAGE_SIZE]

    times = {name: [] for name, _ in vlms}
    outputs = {}
    with torch.inference_mode():
        for name, vlm in vlms:  # warm-up; the accounting and kept counts (deterministic)
            outputs[name] = vlm.generate(ids, pixels, max_new_tokens=1, image_sizes=sizes)
        for _ in range(args.repeats):
            for name, vlm in vlms:
                times[name].append(vlm.generate(ids, pixels, max_new_tokens=1, image_sizes=sizes).timings["prefill"])

    base = statistics.median(times["unpruned"])
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, FFN {args.intermediate}, {args.heads} heads; "
          f"CLIP 336/14 width {args.vision_hidden}, {layout.tiles} tiles; prompt {len(ids[0])} tokens "
          f"({layout.count} visual, image {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; prefill = the LM segments (vision excluded)")
    header = (f"{'method':<20} {'prefill ms':>10} {'time ratio':>10} {'FLOPs ratio':>11} {'equal tok':>9}  "
              "kept (+recycled) per pruning layer")
    print(header)
    print("-" * len(header))
    for name, _ in vlms:
        t = statistics.median(times[name])
        out = outputs[name]
        row = out.accounting["rows"][0]
        kept = ", ".join(f"L{layer['layer']}: {layer['keep_count'][0]}" +
                         (f"+{layer['recycled'][0]}" if layer["recycled"][0] else "")
                         for layer in out.trace["layers"]) or "-"
        print(f"{name:<20} {t * 1e3:>10.1f} {t / base:>10.3f} {row['flops_ratio']:>11.3f} "
              f"{row['equal_tokens']:>9.1f}  {kept}")


if __name__ == "__main__":
    main()
