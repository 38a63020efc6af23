"""Prefill speed at the FLOPs limit: every pruning setting against the unpruned export of the
same model, on ONNX Runtime and on the torch backend, next to plain transformers'
`LlavaForConditionalGeneration` (SDPA) on the same prompt, all measured side by side in one
run (settings and backends interleaved round-robin, medians of the repeats).

    .venv/bin/python benchmarks/bench_speed.py [--layers 18 --hidden 1024 --repeats 5 --threads 2] [--reuse --work DIR]
    .venv/bin/python benchmarks/bench_speed.py --quick      # tiny model, one repeat (CI)

Per setting and backend it prints the LLM-prefill time (the prefill segments; the vision
graph excluded), the same with the vision tower included, the time ratio against the
unpruned export on the same backend, the FLOPs ratio (methods/accounting.py,
docs/accounting.md: decoder layers only) and the efficiency = FLOPs ratio / time ratio
(1.0: the time falls exactly as the FLOPs do). The transformers rows time one forward of
the whole prompt (`logits_to_keep=1`, vision included), the language model alone on the
same input embeddings, and `generate(max_new_tokens=1)` (time to first token); the
`vs transformers` column is transformers' vision-included forward divided by this row's
vision-included prefill (how many times faster the exported model answers). Every run is
timed on two clocks and printed as two tables: elapsed time, and this process's CPU time
(all threads), which stays meaningful when other processes share the cores; the
`efficiency (fastest runs)` column uses each setting's fastest run instead of the median.
The torch backend runs as the runtime runs it on the CPU, its linear layers on oneDNN-packed
weights (methods/cpu_linear.py). A third table times the decoder's linear layers alone at
each setting's per-layer token counts, every layer on its own weights (read from memory as
in the model): how far the GEMM library itself lets the time follow the tokens at those row
counts (`linear efficiency`), the bound under the end-to-end figures.

The model is a random LLaVA-1.5-shaped checkpoint built in code (the demo architecture
widened: CLIP 336/14 with 576 patches, a Llama of `--layers` x `--hidden`, MLP 2 x hidden).
Nothing is downloaded. `--profile` adds where the time goes at each pruned setting (ONNX
Runtime's profiler: kernel time per segment against the session calls' wall time and the
loop's host work between segments).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsevlm.export import export
from sparsevlm.methods.demo_model import build_demo_model
from sparsevlm.runtime import Pipeline
from sparsevlm.runtime.artifact import Artifact
from sparsevlm.runtime.backends import OnnxRuntimeExecutor, graph_names

PROMPT = "Describe the picture in detail. What color is the large square and how many objects are there?"
IMAGE = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"

# (label, sparsevlm.export.export keyword arguments)
SETTINGS = [
    ("unpruned", dict(method="none", budgets=None)),
    ("SparseVLM v1.5 192", dict(method="sparsevlm", variant="v1.5", budgets=[192])),
    ("SparseVLM v1.5 128", dict(method="sparsevlm", variant="v1.5", budgets=[128])),
    ("SparseVLM v1.5 64", dict(method="sparsevlm", variant="v1.5", budgets=[64])),
    ("FasterVLM 75%", dict(method="fastervlm", budgets=None, reduction=0.75)),
    ("FasterVLM 90%", dict(method="fastervlm", budgets=None, reduction=0.90)),
    ("FasterVLM 95%", dict(method="fastervlm", budgets=None, reduction=0.95)),
]
QUICK_SETTINGS = ("unpruned", "SparseVLM v1.5 64", "FasterVLM 95%")  # --quick: one of each kind
BACKENDS = ("onnxruntime", "torch")
COLUMNS = ["backend", "setting", "LLM prefill ms", "time ratio", "FLOPs ratio", "efficiency",
           "efficiency (fastest runs)", "with vision ms", "time ratio (vision)", "vs transformers"]
LINEAR_COLUMNS = ["backend", "setting", "linear ms", "tokens ratio", "time ratio", "linear efficiency"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7, help="interleaved runs per setting and backend (median)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (ONNX Runtime and torch)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model (hidden 64), one repeat, settings "
                        f"{', '.join(QUICK_SETTINGS).replace('%', '%%')}: checks the script runs")
    p.add_argument("--profile", action="store_true", help="also print where ONNX Runtime's prefill time goes")
    p.add_argument("--work", type=Path, default=None, help="directory for the model and artifacts (default: a temp dir)")
    p.add_argument("--reuse", action="store_true", help="keep the model and artifacts already in --work")
    p.add_argument("--json", type=Path, default=None, help="also write every measurement to this JSON file")
    args = p.parse_args(argv)
    args.settings = [(label, options) for label, options in SETTINGS if not args.quick or label in QUICK_SETTINGS]
    if args.quick:
        args.hidden, args.repeats = 64, 1
    if args.layers < 16:
        p.error("--layers: expected >= 16 (SparseVLM v1.5 prunes at layers 2, 6 and 15)")
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads: expected >= 1")
    return args


class TransformersBaseline:
    """Plain transformers' LlavaForConditionalGeneration with SDPA attention, on the same ids."""

    def __init__(self, model_dir: Path, input_ids: list[int], pixel_values: torch.Tensor):
        from transformers import LlavaForConditionalGeneration
        self.model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
        self.ids = torch.tensor([input_ids])
        self.mask = torch.ones_like(self.ids)
        self.pixels = pixel_values
        captured = {}
        language_model = self.model.model.language_model
        hook = language_model.register_forward_pre_hook(
            lambda module, args, kwargs: captured.update(kwargs), with_kwargs=True)
        self.forward()
        hook.remove()
        self.embeds = captured["inputs_embeds"]  # the prompt's embeddings with the image features in place

    @torch.inference_mode()
    def forward(self) -> torch.Tensor:
        """The whole prompt, vision included; logits of the last position only."""
        return self.model(input_ids=self.ids, attention_mask=self.mask, pixel_values=self.pixels,
                          logits_to_keep=1).logits

    @torch.inference_mode()
    def language_model(self) -> torch.Tensor:
        hidden = self.model.model.language_model(inputs_embeds=self.embeds, attention_mask=self.mask).last_hidden_state
        return self.model.lm_head(hidden[:, -1:])

    @torch.inference_mode()
    def first_token(self) -> torch.Tensor:
        return self.model.generate(input_ids=self.ids, attention_mask=self.mask, pixel_values=self.pixels,
                                   max_new_tokens=1, do_sample=False)


CLOCKS = ("wall", "cpu")  # elapsed time; this process's CPU time (all its threads)


def clocks() -> dict:
    return {"wall": time.perf_counter(), "cpu": time.process_time()}


def timed(call) -> dict:
    """{clock: seconds} of one call."""
    t0 = clocks()
    call()
    t1 = clocks()
    return {clock: t1[clock] - t0[clock] for clock in CLOCKS}


def timed_vision(executor, seconds: list) -> None:
    """Wrap `executor.vision` so that each call appends its {clock: seconds} to `seconds`."""
    inner = executor.vision

    def vision(pixel_values):
        out = []
        seconds.append(timed(lambda: out.append(inner(pixel_values))))
        return out[0]
    executor.vision = vision


def build(args, work: Path):
    """The model, one artifact per setting, a pipeline per backend and setting, the baseline."""
    from sparsevlm.methods.cpu_linear import with_packed_linears
    from sparsevlm.methods.generation import TorchExecutor
    from sparsevlm.methods.loading import load_model

    model_dir = build_demo_model(work / "model", num_layers=args.layers, hidden_size=args.hidden)
    artifacts = {}
    for index, (label, options) in enumerate(args.settings):
        where = work / f"artifact-{label.replace(' ', '_').replace('%', '')}"
        if not (args.reuse and (where / "manifest.json").exists()):
            t0 = time.perf_counter()
            export(str(model_dir), where, progress=False, overwrite=True, **options)
            print(f"exported {label} in {time.perf_counter() - t0:.1f} s", flush=True)
            gc.collect()
        artifacts[label] = Artifact.load(where)
    # one model shared by every torch-backend setting; on the CPU with oneDNN-packed linear
    # weights, as the runtime's torch backend runs it (methods/cpu_linear.py)
    torch_model = with_packed_linears(load_model(str(model_dir))[0])
    pipes = {}
    for label, artifact in artifacts.items():
        prefill_graphs = [name for name in graph_names(artifact) if name != "decode"]  # half the memory
        pipes["onnxruntime", label] = Pipeline(
            artifact, OnnxRuntimeExecutor(artifact, threads=args.threads, graphs=prefill_graphs), "onnxruntime")
        pipes["torch", label] = Pipeline(artifact, TorchExecutor(torch_model, artifact.plan), "torch")
    prepared = pipes["onnxruntime", "unpruned"].prepare([IMAGE], [PROMPT], max_new_tokens=1)
    baseline = TransformersBaseline(model_dir, prepared["input_ids"][0], prepared["pixel_values"])
    return pipes, prepared, baseline


def measure(args, pipes, prepared, baseline) -> dict:
    """{clock: {key: {"llm": s, "total": s, "llm_min": s, "flops_ratio": r}}}: medians (and the
    fastest LLM prefill) over `args.repeats` interleaved rounds, each run timed on both clocks.
    The LLM prefill is the run less its vision call (on the wall clock, the loop's own timing
    of its segments)."""
    samples = {clock: {key: {"llm": [], "total": []} for key in pipes} for clock in CLOCKS}
    for clock in CLOCKS:
        for name in ("forward", "language_model", "first_token"):
            samples[clock]["transformers", name] = {"total": []}
    flops, tokens = {}, {}
    vision_seconds = {key: [] for key in pipes}
    for key, pipe in pipes.items():
        timed_vision(pipe.executor, vision_seconds[key])
    for key, pipe in pipes.items():  # warm-up: first-call allocations and ONNX Runtime's lazy init
        pipe.generate_prepared([prepared], max_new_tokens=1, stop_token_ids=[])
    baseline.forward()
    for _ in range(args.repeats):
        for key, pipe in pipes.items():
            outputs = []
            run = timed(lambda: outputs.append(pipe.generate_prepared([prepared], max_new_tokens=1, stop_token_ids=[])))
            out, vision = outputs[0], vision_seconds[key][-1]
            run["wall"], vision["wall"] = out.timings["vision"] + out.timings["prefill"], out.timings["vision"]
            for clock in CLOCKS:
                samples[clock][key]["llm"].append(run[clock] - vision[clock])
                samples[clock][key]["total"].append(run[clock])
            flops[key[1]] = out.accounting["rows"][0]["flops_ratio"]
            tokens[key[1]] = layer_tokens(out, len(prepared["input_ids"][0]) - pipe.spec.num_visual)
        for name in ("forward", "language_model", "first_token"):
            run = timed(getattr(baseline, name))
            for clock in CLOCKS:
                samples[clock]["transformers", name]["total"].append(run[clock])
    result = {}
    for clock in CLOCKS:
        medians = {key: {kind: statistics.median(values) for kind, values in kinds.items()}
                   for key, kinds in samples[clock].items()}
        for key in pipes:  # the least disturbed run of each, for a machine other processes share
            medians[key]["llm_min"] = min(samples[clock][key]["llm"])
            medians[key]["flops_ratio"] = flops[key[1]]
        result[clock] = medians
    return result, tokens


def layer_tokens(out, text_tokens: int) -> list[int]:
    """The tokens entering each decoder layer in this run (batch row 0; the accounting's count)."""
    return [text_tokens + visual for visual in out.accounting["rows"][0]["visual_per_layer_input"]]


def decoder_linears(model) -> list[tuple]:
    """Every decoder layer's linear modules in the order a layer runs them (q, k, v, o, gate,
    up, down): nn.Linear, or PackedLinear on the torch backend's CPU model."""
    from sparsevlm.methods.modeling import language_model
    return [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
             layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj) for layer in language_model(model).layers]


def onnxruntime_linears(layer_shapes, options):
    """A call factory running every layer's linear layers as ONNX Runtime MatMuls, layer l on
    `counts[l]` rows, in one session created with `options` (the bench passes its prefill
    sessions' own). Each layer has its own random weights (the time does not depend on the
    values, but on reading every layer's weights from memory, as the model does)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from sparsevlm.export.exporter import IR_VERSION  # the exported graphs' IR version
    rng = np.random.default_rng(0)
    inputs, nodes, weights, outputs = {}, [], [], []  # inputs: name -> (layer, its width)
    for layer, shapes in enumerate(layer_shapes):
        for index, (k, n) in enumerate(shapes):
            x = f"x{layer}_{k}"
            inputs[x] = (layer, k)
            weights.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02,
                                                   f"w{layer}_{index}"))
            nodes.append(helper.make_node("MatMul", [x, f"w{layer}_{index}"], [f"y{layer}_{index}"]))
            outputs.append(helper.make_tensor_value_info(f"y{layer}_{index}", TensorProto.FLOAT, [1, f"rows{layer}", n]))
    graph_inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, f"rows{layer}", k])
                    for x, (layer, k) in inputs.items()]
    graph = helper.make_graph(nodes, "linears", graph_inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    del model, weights

    def runner(counts: list[int]):
        feeds = {x: rng.standard_normal((1, counts[layer], k), dtype=np.float32) for x, (layer, k) in inputs.items()}
        return lambda: session.run(None, feeds)
    return runner


def linear_layers_bound(model, tokens: dict, repeats: int, ort_options) -> list[dict]:
    """What the GEMM libraries allow: per setting and backend, the decoder's linear layers alone
    (q, k, v, o, gate, up, down of every layer, each layer at its own token count), against
    the unpruned counts: torch on the torch backend's own modules (oneDNN-packed on the CPU),
    ONNX Runtime as MatMuls of the same shapes. Every layer reads its own weights, so the
    weights stream from memory as in the model (one layer's weights alone would stay in the
    cache and flatter small row counts). Settings are interleaved; each one's fastest run.
    `linear efficiency` = the linear layers' FLOPs ratio (the tokens' ratio: their FLOPs are
    linear in the tokens) / their time ratio. Where it is below 0.9, the GEMM's own
    throughput at those row counts, not the toolkit, keeps the setting's efficiency below 0.9
    (attention and the small ops come on top)."""
    layers = decoder_linears(model)
    layer_shapes = [[(module.in_features, module.out_features) for module in modules] for modules in layers]

    def torch_runner(counts: list[int]):
        x = [{k: torch.randn(1, rows, k) for k, _ in shapes} for rows, shapes in zip(counts, layer_shapes)]

        def linears():
            with torch.inference_mode():
                for modules, shapes, inputs in zip(layers, layer_shapes, x):
                    for module, (k, _) in zip(modules, shapes):
                        module(inputs[k])
        return linears
    out = []
    for backend, runner in (("onnxruntime", onnxruntime_linears(layer_shapes, ort_options)), ("torch", torch_runner)):
        calls = {label: runner(counts) for label, counts in tokens.items()}
        for call in calls.values():
            call()
        seconds = {label: [] for label in calls}
        for _ in range(max(5, repeats)):
            for label, call in calls.items():
                seconds[label].append(timed(call)["wall"])
        base_tokens, base_time = sum(tokens["unpruned"]), min(seconds["unpruned"])
        for label, counts in tokens.items():
            elapsed = min(seconds[label])
            token_ratio, time_ratio = sum(counts) / base_tokens, elapsed / base_time
            out.append({"backend": backend, "setting": label, "linear ms": elapsed * 1e3, "tokens ratio": token_ratio,
                        "time ratio": time_ratio, "linear efficiency": token_ratio / time_ratio})
        del calls
        gc.collect()
    return out


def table_rows(medians: dict, settings) -> list[dict]:
    """One row per backend and setting, plus the transformers rows, with COLUMNS' values."""
    transformers_total = medians["transformers", "forward"]["total"]
    rows = []
    for backend in BACKENDS:
        base = medians[backend, "unpruned"]
        for label, _ in settings:
            m = medians[backend, label]
            ratio = m["llm"] / base["llm"]
            rows.append({"backend": backend, "setting": label, "LLM prefill ms": m["llm"] * 1e3,
                         "time ratio": ratio, "FLOPs ratio": m["flops_ratio"],
                         "efficiency": m["flops_ratio"] / ratio,
                         "efficiency (fastest runs)": m["flops_ratio"] / (m["llm_min"] / base["llm_min"]),
                         "with vision ms": m["total"] * 1e3,
                         "time ratio (vision)": m["total"] / base["total"],
                         "vs transformers": transformers_total / m["total"]})
    llm_only = medians["transformers", "language_model"]["total"]
    for name, label in (("language_model", "LLM forward"), ("forward", "forward with vision"),
                        ("first_token", "generate, 1 token")):
        total = medians["transformers", name]["total"]
        rows.append({"backend": "transformers", "setting": label,
                     "LLM prefill ms": llm_only * 1e3 if name == "language_model" else None,
                     "with vision ms": total * 1e3 if name != "language_model" else None,
                     "vs transformers": transformers_total / total if name != "language_model" else None})
    return rows


def format_table(rows: list[dict], columns: list[str] = COLUMNS) -> str:
    """A markdown table (the README's measurement table is pasted from it)."""
    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.1f}" if value >= 10 else f"{value:.4g}"  # 4 digits: small ratios stay exact enough
        return str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-speed-"))
    pipes, prepared, baseline = build(args, work)
    load_before = os.getloadavg()[0]
    measured, tokens = measure(args, pipes, prepared, baseline)
    bound = linear_layers_bound(pipes["torch", "unpruned"].executor.model, tokens, args.repeats,
                                pipes["onnxruntime", "unpruned"].executor.session_options("segment_0"))
    load_after = os.getloadavg()[0]
    tables = {clock: table_rows(measured[clock], args.settings) for clock in CLOCKS}
    print(f"\nLLaVA-shaped random model: Llama {args.layers} layers, hidden {args.hidden}; prompt "
          f"{len(prepared['input_ids'][0])} tokens (576 visual); {args.threads} threads; median of "
          f"{args.repeats} interleaved runs; efficiency = FLOPs ratio / time ratio (LLM prefill); "
          f"load average {load_before:.1f} before, {load_after:.1f} after")
    for clock, title in (("wall", "elapsed time"), ("cpu", "CPU time of this process (all threads; steadier "
                                                          "than elapsed time when other processes load the machine)")):
        print(f"\n{clock}: {title}\n")
        print(format_table(tables[clock]), flush=True)
    print("\nlinear layers alone (elapsed, fastest of the repeats; each setting's per-layer token counts):\n")
    print(format_table(bound, LINEAR_COLUMNS), flush=True)
    if args.json:
        args.json.write_text(json.dumps({**tables, "linear_layers": bound}, indent=1))
    if args.profile:
        from profile_prefill import print_breakdown  # benchmarks/profile_prefill.py
        for label, _ in args.settings:
            print_breakdown(pipes["onnxruntime", label], prepared, label, args.threads)


if __name__ == "__main__":
    main()
