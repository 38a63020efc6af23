#!/usr/bin/env python3
"""GPU prefill benchmark: LLaVA-1.5-7B with random weights in float16, built on the GPU, timed
through the project's PyTorch method path for every pruning setting, side by side in one run.

    python3 benchmarks/gpu_prefill.py --out $OUT/gpu_prefill.txt    a CUDA GPU (about 2 minutes on one H200)
    python3 benchmarks/gpu_prefill.py --dry-run                      no GPU: the same code on the CPU, tiny model

What is timed, per setting: one prefill as `SparseLlava.generate` runs it (the region batch,
the vision tower, every prefill segment with the keep decisions between them, up to the
first token's logits), through `sparsevlm.methods.generation.prefill` on the `TorchExecutor`.
The vision tower is included, as the SparseVLM paper's latency is; the LLM part alone (the
time after the vision tower) is reported too. Times are CUDA events around each call (host
time with --dry-run), after --warmup calls per setting, the median of --runs calls, the
settings interleaved round-robin so clock drift hits them all alike. Beside each setting:
its speedup over the unpruned model, the speedup the paper reports on an A100 where it
reports one, the FLOPs the method's accounting counts (docs/accounting.md: decoder layers
only, multiply-accumulates, as the paper counts) and the efficiency, FLOPs ratio / time
ratio (1.0 = as fast as the FLOPs saved allow). The last row is plain transformers'
`LlavaForConditionalGeneration` forward (SDPA) on the same prompt and image, unpruned.

The model is built on the device (`torch.device` context, the float16 parameters created
and initialised there: seconds, no 7B initialisation on the CPU) from the configuration the
project embeds for the alias llava-1.5-7b (`sparsevlm.methods.loading`), so nothing is
downloaded. The weights are random: times do not depend on their values, only the tokens
kept do (and for SparseVLM v1.5 and FasterVLM the counts are fixed). The prompt is a
LLaVA-1.5 prompt of random words whose length (--prefix + 576 image tokens + --text) makes
the unpruned prefill the paper's 4.62 TFLOPs.

It runs from a source checkout without installation: the `sparsevlm` import names are
mapped onto the checkout's folders as pyproject.toml's package-dir does (`use_source_tree`).
It needs torch, transformers (5.17 or newer), numpy and safetensors; the GPU machines'
torch 2.11 / transformers 5.17 are enough (docs/gpu-benchmark.md).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package_dirs(pyproject: Path) -> dict[str, str]:
    """pyproject.toml's [tool.setuptools.package-dir]: import name -> folder (read with a
    line parser: tomllib is Python 3.11+ and the GPU machine's Python may be older)."""
    mapping, inside = {}, False
    for line in pyproject.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line.startswith("["):
            inside = line == "[tool.setuptools.package-dir]"
        elif inside and (entry := re.fullmatch(r'"([\w.]+)"\s*=\s*"([^"]+)"', line)):
            mapping[entry.group(1)] = entry.group(2)
    if "sparsevlm" not in mapping:
        raise RuntimeError(f"{pyproject}: no [tool.setuptools.package-dir] entry for 'sparsevlm'")
    return mapping


class SourceTreeFinder(importlib.abc.MetaPathFinder):
    """Finds `sparsevlm` and its mapped subpackages in the checkout's folders."""

    def __init__(self, root: Path, mapping: dict[str, str]):
        self.root, self.mapping = root, mapping

    def find_spec(self, name, path=None, target=None):
        folder = self.mapping.get(name)
        if folder is None:
            return None  # not mapped: a module inside a package is found through its __path__
        location = self.root / folder
        return importlib.util.spec_from_file_location(name, location / "__init__.py",
                                                      submodule_search_locations=[str(location)])


def use_source_tree(root: Path = REPO) -> None:
    """`import sparsevlm...` loads this checkout (ahead of any installed copy), so the
    benchmark measures the code next to it, on machines where the project cannot be installed."""
    if "sparsevlm" not in sys.modules:
        sys.meta_path.insert(0, SourceTreeFinder(root, package_dirs(root / "pyproject.toml")))


use_source_tree()
# Nothing is downloaded: on a machine without network no library should wait on the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402 - after the import mapping, like everything from sparsevlm

from sparsevlm.cli import check_output_file, run_cli  # noqa: E402
from sparsevlm.methods import SparseLlava, SparseVLMConfig  # noqa: E402
from sparsevlm.methods.accounting import run_accounting  # noqa: E402
from sparsevlm.methods.generation import make_region_batch, prefill  # noqa: E402
from sparsevlm.methods.inputs import CLIP_MEAN, CLIP_STD  # noqa: E402
from sparsevlm.methods.loading import check_device, load_config  # noqa: E402
from sparsevlm.methods.modeling import check_architecture  # noqa: E402

PROG = "gpu_prefill.py"
MODEL_ALIAS = "llava-1.5-7b"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


class BenchmarkError(ValueError):
    """A setting of this benchmark cannot run here (the message says what to do instead)."""


# --------------------------------------------------------------------------------------
# Settings, and the paper's numbers beside them
# --------------------------------------------------------------------------------------

# SparseVLM (ICML version), Table 1, LLaVA-1.5-7B on one A100-80GB with FlashAttention, image
# encoding + forward: latency in ms and TFLOPs (multiply-accumulates of the decoder layers).
PAPER_UNPRUNED_MS, PAPER_UNPRUNED_TFLOPS = 57.82, 4.62


@dataclass(frozen=True)
class Setting:
    name: str
    config: SparseVLMConfig | None  # None: plain transformers (LlavaForConditionalGeneration.forward)
    paper_ms: float | None = None  # the paper's A100 latency of this setting
    paper_tflops: float | None = None

    @property
    def paper_speedup(self) -> float | None:
        return None if self.paper_ms is None else PAPER_UNPRUNED_MS / self.paper_ms


UNPRUNED = "unpruned"
TRANSFORMERS = "transformers (SDPA)"
SETTINGS = [
    Setting(UNPRUNED, SparseVLMConfig(method="none"), PAPER_UNPRUNED_MS, PAPER_UNPRUNED_TFLOPS),
    Setting("SparseVLM v1.5 192", SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=192), 36.50, 2.14),
    Setting("SparseVLM v1.5 128", SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=128), 33.28, 1.72),
    Setting("SparseVLM v1.5 64", SparseVLMConfig(method="sparsevlm", variant="v1.5", budget=64), 29.89, 1.30),
    Setting("FasterVLM 75%", SparseVLMConfig(method="fastervlm", reduction=0.75)),
    Setting("FasterVLM 90%", SparseVLMConfig(method="fastervlm", reduction=0.90)),
    Setting("FasterVLM 95%", SparseVLMConfig(method="fastervlm", reduction=0.95)),
    Setting("FastV K=2 R=0.75", SparseVLMConfig(method="fastv", K=2, R=0.75)),
    Setting("FastV K=2 192", SparseVLMConfig(method="fastv", K=2, budget=192), 34.87, 2.11),
    Setting(TRANSFORMERS, None),
]


# --------------------------------------------------------------------------------------
# Model, prompt, image
# --------------------------------------------------------------------------------------

def llava_config(dry_run: bool):
    """LLaVA-1.5-7B's configuration as the project embeds it; for the dry run a tiny LLaVA with
    the same structure (CLIP 336/14: 576 visual tokens; 22 Llama layers: every pruning layer)."""
    if not dry_run:
        return load_config(MODEL_ALIAS, random_weights=True)[0]
    from sparsevlm.methods.demo_model import demo_config
    return demo_config(vocab_size=512, image_token_id=4, pad_token_id=3)


def build_random_llava(config, dtype: torch.dtype, device: str):
    """LlavaForConditionalGeneration with random weights, created and initialised on `device`
    in `dtype` (on a GPU: seconds for 7B). Not built on the meta device and moved: the rotary
    tables are buffers computed at construction, which a meta model would lack."""
    from transformers import LlavaForConditionalGeneration
    torch.manual_seed(0)  # seeds the CUDA generators too
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    check_architecture(model)
    return model


def prompt_ids(config, prefix_len: int, text_len: int, seed: int = 0) -> list[int]:
    """BOS, random words up to `prefix_len` tokens, the image's 576 image tokens, `text_len` random words."""
    text = config.text_config
    image = config.image_token_id
    generator = torch.Generator().manual_seed(seed)
    # Words: ids from 10 (after the special tokens) up to the image token, which LLaVA adds after
    # the text vocabulary (32000 of 32064); a tiny test vocabulary puts it among the specials.
    high = text.vocab_size if image < 10 else min(image, text.vocab_size)
    words = lambda n: torch.randint(10, high, (n,), generator=generator).tolist()
    bos = text.bos_token_id if isinstance(text.bos_token_id, int) else 1
    return [bos] + words(prefix_len - 1) + [image] * 576 + words(text_len)


def random_image(image_size: int, seed: int = 1) -> torch.Tensor:
    """A random image normalised as the CLIP processor does, [1, 3, H, W] float32."""
    pixels = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


# --------------------------------------------------------------------------------------
# Clocks: CUDA events on a GPU, the host clock on the CPU
# --------------------------------------------------------------------------------------

class CudaClock:
    """Milliseconds between events recorded on the current stream. `start` waits for earlier
    work, `stop` for the timed work, so each call's span is its own."""

    name = "CUDA events"

    def start(self) -> None:
        torch.cuda.synchronize()
        self._marks = [("start", self._record())]

    def mark(self, name: str) -> None:
        self._marks.append((name, self._record()))

    def stop(self) -> dict[str, float]:
        """{mark: ms since start} for every mark, and "stop"."""
        self.mark("stop")
        self._marks[-1][1].synchronize()
        start = self._marks[0][1]
        return {name: start.elapsed_time(event) for name, event in self._marks[1:]}

    @staticmethod
    def _record():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


class HostClock:
    name = "host clock (time.perf_counter)"

    def start(self) -> None:
        self._marks = [("start", time.perf_counter())]

    def mark(self, name: str) -> None:
        self._marks.append((name, time.perf_counter()))

    def stop(self) -> dict[str, float]:
        self.mark("stop")
        start = self._marks[0][1]
        return {name: (t - start) * 1e3 for name, t in self._marks[1:]}


class VisionMarkingExecutor:
    """The method's executor, marking the clock when the vision tower is done (so one prefill
    call gives the vision + LLM time and the LLM time)."""

    def __init__(self, executor, clock):
        self.executor, self.clock = executor, clock

    def vision(self, pixel_values):
        out = self.executor.vision(pixel_values)
        self.clock.mark("vision")
        return out

    def segment(self, index: int, inputs: dict) -> dict:
        return self.executor.segment(index, inputs)


# --------------------------------------------------------------------------------------
# One timed prefill per setting
# --------------------------------------------------------------------------------------

class MethodPrefill:
    """A setting's prefill through the project's method path (what SparseLlava.generate runs
    before its first token)."""

    def __init__(self, model, config: SparseVLMConfig, ids: list[int], pixels: torch.Tensor, clock):
        self.vlm = SparseLlava(model, config)
        self.ids, self.pixels = [ids], pixels
        self.executor = VisionMarkingExecutor(self.vlm.executor, clock)

    def __call__(self):
        spec, plan = self.vlm.spec, self.vlm.plan
        batch = make_region_batch(self.ids, spec.image_token_id, plan.num_visual, spec.pad_token_id)
        result = prefill(self.executor, plan, batch, self.pixels)
        return result.logits, result.decisions, batch.prompt_lengths[0] - plan.num_visual

    def accounting(self, decisions, text_tokens: int) -> dict:
        return run_accounting(self.vlm.spec, [text_tokens], decisions, self.vlm.plan.method)["rows"][0]


class TransformersPrefill:
    """Plain transformers on the same prompt and image: LlavaForConditionalGeneration.forward
    with its KV cache, the last position's logits only (what generate's prefill computes)."""

    def __init__(self, model, ids: list[int], pixels: torch.Tensor, clock):
        self.model, self.pixels = model, pixels
        self.ids = torch.tensor([ids], device=pixels.device)
        self.unpruned = MethodPrefill(model, SparseVLMConfig(method="none"), ids, pixels, clock)  # for its FLOPs
        self.clock = clock

    def __call__(self):
        # The projector's output ends the vision part. Hooked for this call only: the method
        # path calls the same projector module.
        hook = self.model.model.multi_modal_projector.register_forward_hook(lambda *_: self.clock.mark("vision"))
        try:
            out = self.model(input_ids=self.ids, pixel_values=self.pixels.to(self.model.dtype), logits_to_keep=1,
                             use_cache=True)
        finally:
            hook.remove()
        return out.logits[:, -1], [], len(self.ids[0]) - self.unpruned.vlm.plan.num_visual

    def accounting(self, decisions, text_tokens: int) -> dict:
        return self.unpruned.accounting(decisions, text_tokens)


def measure(runners: dict, clock, warmup: int, runs: int) -> tuple[dict, dict]:
    """({setting: [(total ms, vision ms), ...]}, {setting: (accounting row, logits finite)})."""
    first = {}
    for name, run in runners.items():
        for index in range(warmup):
            clock.start()
            logits, decisions, text_tokens = run()
            clock.stop()
            if index == 0:
                first[name] = (run.accounting(decisions, text_tokens), bool(torch.isfinite(logits).all()))
    times = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():  # interleaved: drift and throttling hit every setting alike
            clock.start()
            run()
            marks = clock.stop()
            times[name].append((marks["stop"], marks.get("vision", float("nan"))))
    return times, first


def summarise(times: dict, first: dict) -> list[dict]:
    """One row per setting: medians, speedups against the unpruned method path, FLOPs, efficiency."""
    def medians(name):
        total = statistics.median(t for t, _ in times[name])
        llm = statistics.median(t - v for t, v in times[name])
        return total, llm, min(t for t, _ in times[name])

    base_total, base_llm, _ = medians(UNPRUNED)
    hf_total = statistics.median(t for t, _ in times[TRANSFORMERS]) if TRANSFORMERS in times else None
    rows = []
    for setting in SETTINGS:
        if setting.name not in times:
            continue
        total, llm, fastest = medians(setting.name)
        accounting, finite = first[setting.name]
        flops_ratio = accounting["flops_ratio"]
        rows.append({
            "setting": setting.name,
            "config": None if setting.config is None else setting.config.to_dict(),
            "mean_visual_tokens": accounting["mean_layer_input_tokens"],
            "tflops": accounting["flops"] / 1e12,
            "flops_ratio": flops_ratio,
            "ms": total, "min_ms": fastest, "llm_ms": llm, "vision_ms": total - llm,
            "speedup": base_total / total,
            "llm_speedup": base_llm / llm,
            "vs_transformers": None if hf_total is None else hf_total / total,
            # FLOPs ratio / time ratio: 1.0 = the time falls as the FLOPs do (a pruning method's figure)
            "efficiency_llm": None if setting.config is None else flops_ratio * base_llm / llm,
            "efficiency_with_vision": None if setting.config is None else flops_ratio * base_total / total,
            "paper_speedup": setting.paper_speedup, "paper_tflops": setting.paper_tflops,
            "paper_efficiency": None if setting.paper_tflops is None
            else setting.paper_tflops / PAPER_UNPRUNED_TFLOPS * setting.paper_speedup,
            "logits_finite": finite,
        })
    return rows


def format_table(rows: list[dict]) -> list[str]:
    def optional(value, spec, suffix=""):
        return "-" if value is None else f"{value:{spec}}{suffix}"

    columns = [("setting", "<19"), ("vis tok", ">7"), ("TFLOPs", ">8"), ("FLOPs", ">5"), ("ms", ">8"),
               ("speedup", ">7"), ("paper", ">6"), ("LLM ms", ">8"), ("LLM spd", ">7"), ("eff LLM", ">7"),
               ("eff all", ">7"), ("paper eff", ">9"), ("vs HF", ">6")]
    header = " ".join(f"{title:{spec}}" for title, spec in columns)
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = [row["setting"], f"{row['mean_visual_tokens']:.1f}", f"{row['tflops']:.3g}",
                 f"{row['flops_ratio']:.3f}", f"{row['ms']:.2f}", f"{row['speedup']:.2f}x",
                 optional(row["paper_speedup"], ".2f", "x"), f"{row['llm_ms']:.2f}", f"{row['llm_speedup']:.2f}x",
                 optional(row["efficiency_llm"], ".2f"), optional(row["efficiency_with_vision"], ".2f"),
                 optional(row["paper_efficiency"], ".2f"), optional(row["vs_transformers"], ".2f", "x")]
        lines.append(" ".join(f"{cell:{spec}}" for cell, (_, spec) in zip(cells, columns)))
    return lines


LEGEND = """\
vis tok: visual tokens at a decoder layer's input, mean over the layers (SparseVLM: kept + recycled).
TFLOPs, FLOPs: the prefill's decoder-layer multiply-accumulates (as the paper counts; ViT and LM head
  excluded) and their ratio to the unpruned model's.
ms: vision tower + LLM prefill up to the first token's logits, median; speedup: unpruned ms / ms.
paper: the speedup the SparseVLM paper reports on an A100-80GB (57.82 ms unpruned; 36.50 / 33.28 /
  29.89 ms for SparseVLM 192 / 128 / 64, 34.87 ms for FastV 192); paper eff: its FLOPs ratio x speedup.
LLM ms, LLM spd: the same without the vision tower. eff LLM, eff all: FLOPs ratio x speedup (1.00 =
  time falls as fast as the FLOPs), LLM alone and with the vision tower.
vs HF: plain transformers' forward time / ms (above 1: faster than what users run today)."""


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

def positive_int(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: run the same code on the CPU on a tiny random LLaVA (host-clock times)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda; cpu with --dry-run, where cuda gives a quick device smoke test)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="weights and activations (default: float16, float32 with --dry-run)")
    parser.add_argument("--warmup", type=positive_int, default=None, help="calls per setting first (default 3; 1 dry)")
    parser.add_argument("--runs", type=positive_int, default=None, help="timed calls per setting (default 30; 3 dry)")
    parser.add_argument("--prefix", type=positive_int, default=35, help="prompt tokens before the image (default 35)")
    parser.add_argument("--text", type=positive_int, default=83,
                        help="prompt tokens after the image (default 83: the unpruned prefill is the paper's 4.62 TFLOPs)")
    parser.add_argument("--skip-transformers", action="store_true", help="leave out the plain transformers row")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 with --dry-run, torch's default otherwise)")
    parser.add_argument("--out", help="also write the report (the printed text) to this file")
    parser.add_argument("--json", help="write the rows as JSON to this file")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a failure")
    return parser


def with_index(device: str) -> str:
    """'cuda' -> 'cuda:<current device>' (torch.cuda.set_device refuses a device without an index)."""
    parsed = torch.device(device)
    return str(parsed) if parsed.index is not None else f"{parsed.type}:{torch.cuda.current_device()}"


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} thread(s)"


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    args = build_parser().parse_args(argv)
    dry = args.dry_run
    device = args.device or ("cpu" if dry else "cuda")
    dtype_name = args.dtype or ("float32" if dry else "float16")
    warmup = args.warmup or (1 if dry else 3)
    runs = args.runs or (3 if dry else 30)
    for path, what in ((args.out, "--out"), (args.json, "--json")):
        if path:
            check_output_file(path, what)  # before the work, not after it
    if not dry and not torch.cuda.is_available():
        raise BenchmarkError(f"no CUDA device: torch {torch.__version__} sees none here (CUDA build: "
                             f"{torch.version.cuda or 'none'}); run with --dry-run for the CPU rehearsal on a tiny model")
    if not dry and not device.startswith("cuda"):
        raise BenchmarkError(f"--device {device}: the 7B benchmark runs on a CUDA device (cuda, cuda:N); "
                             "--dry-run runs the tiny model on the CPU")
    check_device(device)
    if device.startswith("cuda"):
        device = with_index(device)
        torch.cuda.set_device(device)  # events, synchronize and the memory peak use the current device
    if args.threads or dry:
        torch.set_num_threads(args.threads or 1)
    import transformers

    build_started = time.perf_counter()
    config = llava_config(dry)
    model = build_random_llava(config, DTYPES[dtype_name], device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    build_seconds = time.perf_counter() - build_started

    ids = prompt_ids(config, args.prefix, args.text)
    pixels = random_image(config.vision_config.image_size).to(device)
    clock = CudaClock() if device.startswith("cuda") else HostClock()
    runners = {s.name: MethodPrefill(model, s.config, ids, pixels, clock) for s in SETTINGS if s.config is not None}
    if not args.skip_transformers:
        runners[TRANSFORMERS] = TransformersPrefill(model, ids, pixels, clock)
    with torch.inference_mode():
        times, first = measure(runners, clock, warmup, runs)
    rows = summarise(times, first)

    text_config = config.text_config
    report = [
        f"gpu_prefill: {'DRY RUN, tiny random LLaVA' if dry else 'LLaVA-1.5-7B, random weights'}"
        f" on {describe_device(device)}",
        f"model: Llama {text_config.num_hidden_layers} layers, hidden {text_config.hidden_size}, "
        f"MLP {text_config.intermediate_size}; CLIP {config.vision_config.num_hidden_layers} layers, hidden "
        f"{config.vision_config.hidden_size}, {config.vision_config.image_size}/{config.vision_config.patch_size}; "
        f"{dtype_name}; built on {device} in {build_seconds:.1f} s",
        f"prompt: {len(ids)} tokens ({args.prefix} + 576 image + {args.text}), batch 1; "
        f"{clock.name}, median of {runs} after {warmup} warm-up call(s) per setting, interleaved",
        f"torch {torch.__version__}, transformers {transformers.__version__} (its forward: "
        f"{model.config.text_config._attn_implementation} attention), python {platform.python_version()}, "
        f"sparsevlm from {Path(sys.modules['sparsevlm.methods'].__file__).parent.parent}",
        "",
        *format_table(rows),
        "",
        LEGEND,
    ]
    bad = [row["setting"] for row in rows if not row["logits_finite"]]
    if bad:
        report.append(f"WARNING: non-finite logits in {', '.join(bad)} (the times stand; the tokens kept may not)")
    if device.startswith("cuda"):
        report.append(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    report.append(f"total {time.perf_counter() - started:.0f} s")
    text = "\n".join(report)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps({"dry_run": dry, "device": describe_device(device), "dtype": dtype_name,
                                               "prompt_tokens": len(ids), "runs": runs, "warmup": warmup,
                                               "rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(PROG, main, user_errors=(BenchmarkError,)))
