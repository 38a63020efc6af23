"""PyTorch method benchmark: prefill wall time (vision + prefill) of each pruning method
relative to the unpruned model, measured side by side in one run (configurations
interleaved round-robin, median of the repeats), next to the FLOPs ratio from the method's
own accounting (docs/accounting.md: LLM decoder layers only, ViT and LM head excluded).

    /work/venv/bin/python benchmarks/bench_methods.py [--layers 18 --hidden 1024 --repeats 3 --threads 1]

The model is a random LLaVA-1.5-shaped model built in code: CLIP 336/14 (576 patches, small
width) and a Llama with SparseVLM's pruning layers 2/6/15 present; weights are drawn with
`separate_decisions` so attention is not uniform. Nothing is downloaded or written to disk.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sparsevlm.methods import SparseLlava, SparseVLMConfig
from sparsevlm.methods.demo_model import demo_config, separate_decisions

IMAGE_TOKEN, PAD, BOS = 4, 3, 1

CONFIGS = [
    ("unpruned", SparseVLMConfig(method="none")),
    ("SparseVLM v1.5 192", SparseVLMConfig(method="sparsevlm", budget=192)),
    ("SparseVLM v1.5 128", SparseVLMConfig(method="sparsevlm", budget=128)),
    ("SparseVLM v1.5 64", SparseVLMConfig(method="sparsevlm", budget=64)),
    ("FasterVLM 144", SparseVLMConfig(method="fastervlm", budget=144)),
    ("FasterVLM 58", SparseVLMConfig(method="fastervlm", budget=58)),
    ("FastV K=2 R=0.5", SparseVLMConfig(method="fastv", K=2, R=0.5)),
]


def build_model(layers: int, hidden: int, intermediate: int, heads: int, vision_hidden: int, seed: int = 0):
    from transformers import LlavaForConditionalGeneration

    config = demo_config(vocab_size=512, image_token_id=IMAGE_TOKEN, pad_token_id=PAD, num_layers=layers,
                         hidden_size=hidden, vision_hidden=vision_hidden)
    text = config.text_config
    text.num_attention_heads = text.num_key_value_heads = heads
    text.head_dim = hidden // heads
    text.intermediate_size = intermediate
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    separate_decisions(model, seed)
    return model


def prompt_ids(prefix_len: int, text_len: int, seed: int = 0) -> list[int]:
    """A LLaVA-1.5-like prompt: system/prefix tokens, 576 image tokens, question + 'ASSISTANT:'."""
    gen = torch.Generator().manual_seed(seed)
    words = lambda n: (torch.randint(10, 500, (n,), generator=gen)).tolist()
    return [BOS] + words(prefix_len - 1) + [IMAGE_TOKEN] * 576 + words(text_len)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--prefix", type=int, default=35, help="prompt tokens before the image")
    parser.add_argument("--text", type=int, default=40, help="prompt tokens after the image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared, oversubscribed CPU two "
                             "OpenMP threads measured 3-10x slower and far noisier; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_model(args.layers, args.hidden, args.intermediate, args.heads, args.vision_hidden)
    ids = [prompt_ids(args.prefix, args.text)]
    # A random image, normalised as the CLIP processor does (generate refuses values outside that range).
    from sparsevlm.methods.inputs import CLIP_MEAN, CLIP_STD
    pixels = (torch.rand(1, 3, 336, 336, generator=torch.Generator().manual_seed(1))
              - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    vlms = [(name, SparseLlava(model, config)) for name, config in CONFIGS]

    times = {name: [] for name, _ in vlms}
    accounting = {}
    with torch.inference_mode():
        for name, vlm in vlms:  # warm-up, and the accounting (deterministic)
            accounting[name] = vlm.generate(ids, pixels, max_new_tokens=1).accounting["rows"][0]
        for _ in range(args.repeats):
            for name, vlm in vlms:
                timings = vlm.generate(ids, pixels, max_new_tokens=1).timings
                times[name].append(timings["vision"] + timings["prefill"])

    base = statistics.median(times["unpruned"])
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, FFN {args.intermediate}, {args.heads} heads; "
          f"CLIP 336/14 width {args.vision_hidden}; prompt {len(ids[0])} tokens (576 visual); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    header = f"{'method':<20} {'prefill ms':>10} {'time ratio':>10} {'FLOPs ratio':>11} {'equal tok':>9} {'mean in tok':>11}"
    print(header)
    print("-" * len(header))
    for name, _ in vlms:
        t = statistics.median(times[name])
        row = accounting[name]
        print(f"{name:<20} {t * 1e3:>10.1f} {t / base:>10.3f} {row['flops_ratio']:>11.3f} "
              f"{row['equal_tokens']:>9.1f} {row['mean_layer_input_tokens']:>11.1f}")


if __name__ == "__main__":
    main()
