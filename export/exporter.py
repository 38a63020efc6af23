"""`sparsevlm-export`: a LLaVA checkpoint + a pruning method -> ONNX graphs + manifest.

Export decisions, in one place:
- Graphs: `vision` (CLIP + projector [+ FasterVLM's TopKTokenSelect]), `segment_<i>` (the
  prefill split at the pruning layers, see methods/segments.py) and `decode` (one token
  through every layer with per-segment caches). One graph set per budget.
- Tracing: the legacy TorchScript exporter (`dynamo=False`) over our own segment modules,
  with the inputs recorded from a real run of the method on a short example (two prompts,
  48 visual tokens). It is 10-20x faster than dynamo here and keeps every dimension
  symbolic because the modules make no Python decisions from tensor sizes
  (docs/export.md); the parity tests run the graphs at full size.
  Opset 17. No constant folding at export: it would copy every transposed weight (14 GB
  more at 7B); ONNX Runtime and TensorRT fold those transposes when they load the graph.
- Custom ops: `sparsevlm::TopKTokenSelect|TokenPrune|TokenRecycle` nodes with
  `plugin_namespace`/`plugin_version`, each with a model-local function body traced from
  the PyTorch reference (export/onnx_ops.py), so stock ONNX Runtime runs them.
- The data-dependent keep count enters a pruning segment as `keep_count` values plus the
  shape input `visual_width` ([W]); the runtime chooses W and the profile containing it.
  The matrix rank (rank rules) is a runtime step: graphs output `rater_attention`.
- Weights: traced with `export_params=False` and written straight from the torch tensors,
  one file per parameter in `weights/` (named as in the transformers model), shared by
  every graph of the artifact (see `_external_weights` for why).
- IR version 10 (ONNX Runtime 1.31 refuses 14, onnx 1.23's default). Every graph passes
  `onnx.checker.check_model(full_check=True)` (which runs strict shape inference).
- Atomic output: everything goes to a temporary sibling directory that is renamed into
  place at the end, with manifest.json written last.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import onnx
import torch

from sparsevlm import __version__
from sparsevlm.cli import (OptionError, add_method_arguments, add_quiet_flag, add_verbose_flag, command,
                           method_budgets_from_args, method_options_from_args)
from sparsevlm.methods.files import atomic_directory, check_output_directory, is_toolkit_output
from sparsevlm.methods.config import SparseVLMConfig, resolve_for_spec
from sparsevlm.methods.generation import (TorchExecutor, build_batch, decode_tokens, make_region_batch, prefill,
                                             SamplingParams)
from sparsevlm.methods.loading import config_sha256, load_model
from sparsevlm.methods.segments import DecodeStep, PrefillSegment, VisionEncoder, graph_signature, plan_segments
from sparsevlm.methods.spec import ModelSpec

from . import manifest as manifest_lib
from . import profiles as profile_lib
from .onnx_ops import DOMAIN, EXPORT_DTYPES, FUNCTION_OPSET, ONNX_OPS, OP_VERSION, attach_functions, register_schemas

IR_VERSION = 10
log = logging.getLogger(__name__)
EXAMPLE_VISUAL_TOKENS = 48  # visual tokens in the tracing example (see _ShortVisualExecutor)


class _Positional(torch.nn.Module):
    """Adapts a dict-in/dict-out module to positional tensors for the tracer."""

    def __init__(self, module, input_names, output_names):
        super().__init__()
        self.module, self.input_names, self.output_names = module, input_names, output_names

    def forward(self, *args):
        out = self.module(dict(zip(self.input_names, args)))
        return tuple(out[name] for name in self.output_names)


class _RecordingExecutor(TorchExecutor):
    """Runs the method and keeps the inputs each graph saw (the tracing examples)."""

    def __init__(self, model, plan):
        super().__init__(model, plan)
        self.recorded = {}

    def vision(self, pixel_values):
        self.recorded.setdefault("vision", pixel_values if isinstance(pixel_values, dict)
                                 else {"pixel_values": pixel_values})
        return super().vision(pixel_values)

    def segment(self, index, inputs):
        self.recorded.setdefault(f"segment_{index}", dict(inputs))
        return super().segment(index, inputs)

    def decode(self, inputs):
        self.recorded.setdefault("decode", dict(inputs))
        return super().decode(inputs)


class _ShortVisualExecutor(_RecordingExecutor):
    """Hands the LM segments only the first `tokens` visual tokens of the image: every
    dimension is symbolic in the traced graphs, so a short example traces the same graph
    as a full one, and tracing a 7B model stays affordable on a CPU."""

    def __init__(self, model, plan, tokens):
        super().__init__(model, plan)
        self.tokens = tokens

    def vision(self, pixel_values):
        out = {name: value[:, :self.tokens] for name, value in super().vision(pixel_values).items()}
        if "kept_mask" in out:  # anyres FasterVLM: its first tokens may hold no kept one; keep one
            out["kept_mask"] = out["kept_mask"].clone()
            out["kept_mask"][:, 0] = True
        return out


def example_visual_tokens(plan) -> int:
    """Visual tokens in the tracing example: enough for every top-k the method runs."""
    needed = max(EXAMPLE_VISUAL_TOKENS, (plan.fastv_keep or 0) if plan.fixed_topk else 0)
    return min(needed, plan.vision_width)


def example_anyres_inputs(spec: ModelSpec, tokens: int, dtype: torch.dtype, generator) -> tuple[dict, list[int]]:
    """Anyres vision inputs for the tracing example, and each row's visual count: one CLIP
    tile per row (a real image takes 3-5 tiles of the ViT, the costly part of tracing a 7B
    model on a CPU) and, per row, `tokens` gather indices into the two tiles' patches and the
    newline, the second row shorter. The vision graph only gathers by these indices, so every
    layout traces to the same graph (the parity tests run real layouts)."""
    size, per_tile = spec.image_size, spec.tile_tokens
    tiles = torch.randn(2, 3, size, size, generator=generator).to(dtype)
    index = torch.stack([(torch.arange(tokens) + row * per_tile) % (2 * per_tile) for row in range(2)])
    index[:, tokens // 2] = 2 * per_tile  # an image_newline
    valid = torch.ones(2, tokens, dtype=torch.bool)
    valid[1, tokens - tokens // 4:] = False
    return {"tiles": tiles, "image_index": index, "image_valid": valid}, valid.sum(dim=1).tolist()


def _example_run(model, plan, spec: ModelSpec | None = None):
    """Two prompts of different lengths through the method; records every graph's inputs."""
    config = model.config
    spec = spec or ModelSpec.from_hf_config(config)
    vocab, image = config.text_config.vocab_size, config.image_token_id
    gen = torch.Generator().manual_seed(0)
    draw = lambda n: [t for t in torch.randint(3, vocab, (2 * n,), generator=gen).tolist() if t != image][:n]
    ids = [[1] + draw(3) + [image] + draw(9), [1] + draw(5) + [image] + draw(6)]
    tokens = example_visual_tokens(plan)
    executor = _ShortVisualExecutor(model, plan, tokens)
    if spec.mrope:  # Qwen2.5-VL: two small images of different grids (24 and 12 visual tokens)
        from sparsevlm.methods.qwen2_5_vl import example_images, layout_config
        pixels, sizes = example_images(layout_config(spec), dtype=model.dtype)
        vision_in, _, batch = build_batch(spec, ids, pixels, sizes, pad_id=0)
    elif spec.anyres:
        vision_in, counts = example_anyres_inputs(spec, tokens, model.dtype, gen)
        batch = make_region_batch(ids, image, counts, 0)
    else:
        size = config.vision_config.image_size
        vision_in = torch.randn(2, 3, size, size, generator=gen).to(model.dtype)
        batch = make_region_batch(ids, image, plan.num_visual, 0)
    result = prefill(executor, plan, batch, vision_in)
    for _ in decode_tokens(executor, plan_segments(plan), result, SamplingParams(max_new_tokens=2)):
        pass
    return executor.recorded


def _trace(module, example: dict, path: Path, opset: int) -> dict[str, torch.Tensor]:
    """Trace `module` to `path` without its weights, with the names and dynamic axes of its
    `graph_signature`; returns the parameters by graph input name."""
    signature = graph_signature(module)
    input_names = list(signature.inputs)
    if set(example) != set(input_names):
        raise RuntimeError(f"export: the example run fed {sorted(example)}, but the graph takes {input_names}")
    wrapper = _Positional(module, input_names, list(signature.method_names.values()))
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(wrapper, tuple(example[name] for name in input_names), str(path), dynamo=False,
                          opset_version=opset, input_names=input_names, output_names=list(signature.outputs),
                          dynamic_axes=signature.dynamic_axes,
                          custom_opsets={DOMAIN: OP_VERSION}, do_constant_folding=False, export_params=False)
    return dict(wrapper.named_parameters()) | dict(wrapper.named_buffers())


WEIGHTS_DIR = "weights"


def _finish_graph(path: Path, parameters: dict[str, torch.Tensor], weight_names: dict,
                  dtype: torch.dtype) -> tuple[list[str], int]:
    """Attach function bodies, set the IR version, point the weights at `weights/`, check.

    Returns the custom ops used and the graph's size in bytes (proto + the weights it uses)."""
    model = onnx.load(str(path))  # traced with export_params=False: no weights inside, small
    ops = attach_functions(model, dtype)  # op bodies typed for the graph's float type
    model.ir_version = IR_VERSION
    weight_bytes = _external_weights(model, parameters, weight_names, path)
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return ops, path.stat().st_size + weight_bytes


def _external_weights(model: onnx.ModelProto, parameters: dict[str, torch.Tensor], weight_names: dict,
                      path: Path) -> int:
    """Turn the graph inputs the tracer made for parameters into external-data initializers.

    The graphs are traced with `export_params=False`, so each parameter is a graph input
    named by its module path. Here each one is written once, straight from its torch
    tensor, to `weights/<its name in the transformers model>`, and every graph that uses
    it points at that file. (A tensor the model does not own gets a name private to the
    graph at `path`.) Serialising weights inside the graphs instead made torch's exporter
    hold about three copies of every graph under 2 GB (peak 21.6 GB at 7B); this way the
    export holds the model and little more, and an artifact's graphs share one set of
    weights. Returns the bytes of the weights this graph uses."""
    total = 0
    kept_inputs = []
    for value in model.graph.input:
        tensor = parameters.get(value.name)
        if tensor is None:
            kept_inputs.append(value)
            continue
        name = weight_names.get(_storage_key(tensor)) or f"{path.stem}.{value.name}"
        location = f"{WEIGHTS_DIR}/{name}"
        target = path.parent / location
        flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if not target.exists():  # an earlier graph of this artifact wrote it already
            target.parent.mkdir(exist_ok=True)
            flat.numpy().tofile(target)
        initializer = onnx.TensorProto(name=value.name, dims=list(tensor.shape),
                                       data_type=value.type.tensor_type.elem_type)
        for key, text in (("location", location), ("offset", "0"), ("length", str(flat.numel()))):
            entry = initializer.external_data.add()
            entry.key, entry.value = key, text
        initializer.data_location = onnx.TensorProto.EXTERNAL
        model.graph.initializer.append(initializer)
        total += flat.numel()
    del model.graph.input[:]
    model.graph.input.extend(kept_inputs)
    return total


def _storage_key(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tuple(tensor.shape), tensor.dtype


def _weight_file_names(model) -> dict:
    """Weight file name per parameter tensor: its name in the transformers model, the same in every graph."""
    names = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        names.setdefault(_storage_key(tensor), name)
    return names


_ELEM = {v: k for k, v in onnx.TensorProto.DataType.items()}


def _io_table(path: Path) -> tuple[list, list]:
    graph = onnx.load(str(path), load_external_data=False).graph
    def entry(value):
        t = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return {"name": value.name, "dtype": _ELEM[t.elem_type].lower(), "shape": shape}
    return [entry(v) for v in graph.input], [entry(v) for v in graph.output]


def _peak_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def export_artifact(model, location: str, config: SparseVLMConfig, out: Path, *, dtype: str = "float32",
                    opset: int = FUNCTION_OPSET, buckets: list | None = None, processor_dir: str | None = None,
                    overwrite: bool = False, progress: bool = True) -> dict:
    """Export one graph set (one method configuration / budget) to the directory `out`."""
    from tqdm.auto import tqdm

    register_schemas()
    spec = ModelSpec.from_hf_config(model.config, processor_dir)  # written into the manifest
    plan = resolve_for_spec(config, spec)
    specs = plan_segments(plan)
    out = check_output_directory(out, overwrite, is_artifact)
    started = time.perf_counter()
    with atomic_directory(out, "partial-", overwrite=overwrite, replaceable=is_artifact) as tmp:
        recorded = _example_run(model, plan, spec)
        graphs = [("vision", VisionEncoder(model, plan, ONNX_OPS))]
        graphs += [(f"segment_{s.index}", PrefillSegment(model, plan, s, ONNX_OPS)) for s in specs]
        graphs.append(("decode", DecodeStep(model, specs)))
        table, weight_names = {}, _weight_file_names(model)
        bar = tqdm(graphs, desc=f"export {out.name}", unit="graph", disable=not progress)
        for name, module in bar:
            bar.set_postfix_str(name)
            path = tmp / f"{name}.onnx"
            t0 = time.perf_counter()
            parameters = _trace(module, recorded[name], path, opset)
            ops, size = _finish_graph(path, parameters, weight_names, model.dtype)
            inputs, outputs = _io_table(path)
            table[name] = {"file": path.name, "bytes": size, "inputs": inputs, "outputs": outputs,
                           "custom_ops": ops, "export_seconds": round(time.perf_counter() - t0, 3)}
            log.info("%s: exported in %.1f s; peak RSS so far %.2f GB", name, table[name]["export_seconds"], _peak_rss_gb())
        buckets = buckets or profile_lib.default_buckets(plan)
        if len(buckets) != len(plan.prune_layers):
            raise ValueError(f"calibration: {len(buckets)} bucket lists for {len(plan.prune_layers)} pruning layers")
        for name, graph_profiles in profile_lib.graph_profiles(plan, len(specs), plan.vision_width, buckets).items():
            table[name]["profiles"] = graph_profiles
        if processor_dir:
            _copy_processor(Path(processor_dir), tmp / "processor")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "schema": manifest_lib.SCHEMA, "created_by": f"sparsevlm-trt {__version__}",
            "torch": torch.__version__, "onnx": onnx.__version__,
            "model": {"source": location, "config_sha256": config_sha256(model), **spec.to_json(),
                      "processor": "processor" if processor_dir else None},
            "method": config.to_dict(), "trace_method": plan.trace_method(), "prune_layers": list(plan.prune_layers),
            "dtype": dtype, "opset": opset, "ir_version": IR_VERSION,
            "ops": {"domain": DOMAIN, "version": OP_VERSION, "rank": "runtime" if plan.uses_rank else None},
            "segments": [{"index": s.index, "graph": f"segment_{s.index}", "first_layer": s.first_layer,
                          "last_layer": s.last_layer, "ends_at_prune_layer": s.ends_at_prune_layer,
                          "profile_dim": "visual_width" if s.index > 0 else None} for s in specs],
            "graphs": table,
            "files": manifest_lib.file_table(tmp, files),
        }
        (tmp / manifest_lib.MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks the artifact valid
    manifest["export_seconds"] = round(time.perf_counter() - started, 3)
    return manifest


def _copy_processor(source: Path, target: Path) -> None:
    """The tokenizer / image-processor / chat-template files, so the artifact is self-contained."""
    target.mkdir()
    for file in source.iterdir():
        if file.is_file() and not file.name.endswith((".safetensors", ".bin")) and file.name != "config.json" \
                and file.suffix in (".json", ".jinja", ".model", ".txt"):
            shutil.copy2(file, target / file.name)


def is_artifact(path: Path) -> bool:
    """An artifact this toolkit wrote (the only non-empty directory --overwrite replaces)."""
    return (Path(path) / manifest_lib.MANIFEST).is_file() and is_toolkit_output(path)


def check_opset(opset: int) -> None:
    """The graphs need FUNCTION_OPSET; the TorchScript exporter (dynamo=False) stops at its maximum."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as highest
    except ImportError:
        highest = 20
    if not isinstance(opset, int) or not FUNCTION_OPSET <= opset <= highest:
        raise OptionError(f"--opset: expected {FUNCTION_OPSET}..{highest} (below {FUNCTION_OPSET} SDPA and the op "
                          f"bodies do not exist; above {highest} torch's exporter cannot write), got {opset}")


def load_calibration(path: str | Path) -> tuple[dict, list]:
    """A calibration.json's content and its bucket lists in segment order, its shape checked
    (sparsevlm.methods.profiles.read_calibration, the file's one home); `calibration_buckets`
    also checks that it fits an export."""
    from sparsevlm.methods.profiles import calibration_bucket_lists, read_calibration
    data = read_calibration(path)
    return data, calibration_bucket_lists(data)


def calibration_buckets(path: str | Path, plan, torch_model) -> list:
    """The buckets of a calibration.json checked against this export's model and method
    (sparsevlm.methods.profiles.check_calibration)."""
    from sparsevlm.methods.profiles import check_calibration
    return check_calibration(load_calibration(path)[0], path, plan.config.to_dict(), config_sha256(torch_model),
                             len(plan.prune_layers), plan.vision_width, profile_lib.static_widths(plan))


def export(model: str, out: str | Path, method: str = "sparsevlm", variant: str | None = None,
           budgets: list[int] | tuple[int, ...] | None = (192,), dtype: str = "float32", opset: int = FUNCTION_OPSET,
           random_weights: bool = False, calibration: str | None = None, overwrite: bool = False,
           progress: bool = True, **method_options) -> list[dict]:
    """Python API of `sparsevlm-export`: one artifact per budget (`out` itself for a single
    budget, `out/b<budget>` for several). Returns the manifests."""
    if dtype not in EXPORT_DTYPES:  # bfloat16: see EXPORT_DTYPES (no ONNX Runtime CPU kernels)
        raise ValueError(f"--dtype: expected one of {', '.join(sorted(EXPORT_DTYPES))}, got {dtype!r}")
    check_opset(opset)
    budgets = list(budgets) if budgets else [None]
    duplicates = sorted({b for b in budgets if budgets.count(b) > 1 and b is not None})
    if duplicates:
        raise OptionError(f"--budget: {', '.join(map(str, duplicates))} given more than once; expected distinct budgets")
    configs = [SparseVLMConfig(method=method, variant=variant, budget=b, **method_options) for b in budgets]
    targets = [Path(out) if len(configs) == 1 else Path(out) / f"b{config.budget}" for config in configs]
    for target in targets:  # every output location, before the model loads
        check_output_directory(target, overwrite, is_artifact)
    if calibration:
        load_calibration(calibration)  # its shape now; its model and method once the model is loaded
        if len(configs) > 1:
            raise OptionError("--calibration: a calibration holds for one method setting; export one --budget with it")
    torch_model, location = load_model(model, dtype=dtype, random_weights=random_weights)
    processor_dir = location if Path(location).is_dir() else None
    spec = ModelSpec.from_hf_config(torch_model.config, processor_dir)  # Qwen2.5-VL: its pixel range
    plans = [resolve_for_spec(config, spec) for config in configs]  # every budget is valid before anything is written
    buckets = calibration_buckets(calibration, plans[0], torch_model) if calibration else None
    manifests = []
    for config, target in zip(configs, targets):
        manifests.append(export_artifact(torch_model, location, config, target, dtype=dtype, opset=opset,
                                         buckets=buckets, processor_dir=processor_dir, overwrite=overwrite,
                                         progress=progress))
        manifests[-1]["path"] = str(target)
    return manifests


def _summary(manifests: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="sparsevlm-export")
    for column in ("artifact", "graph", "size (MB)", "custom ops", "inputs", "outputs", "time (s)"):
        table.add_column(column)
    for m in manifests:
        for name, graph in m["graphs"].items():
            table.add_row(m["path"], name, f"{graph['bytes'] / 1e6:.1f}", ",".join(graph["custom_ops"]) or "-",
                          str(len(graph["inputs"])), str(len(graph["outputs"])), str(graph["export_seconds"]))
    Console(stderr=False).print(table)
    total = sum(m["export_seconds"] for m in manifests)
    print(f"exported {len(manifests)} artifact(s) in {total:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevlm-export", description=(
        "Export a LLaVA checkpoint with a visual-token pruning method to ONNX graphs with `sparsevlm` custom ops "
        "(one graph set per budget) plus manifest.json, ready for ONNX Runtime, sparsevlm-build (TensorRT) and "
        "sparsevlm-run."))
    p.add_argument("--model", required=True, help="local HF LLaVA directory, hub id (owner/name), or alias: "
                   "llava-1.5-7b, llava-1.5-13b, llava-v1.6-vicuna-7b, llava-v1.6-vicuna-13b, llava-v1.6-mistral-7b, "
                   "qwen2.5-vl-3b, qwen2.5-vl-7b, demo (the built-in tiny model)")
    add_method_arguments(p, several_budgets=True)
    p.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES),
                   help="weights and activations dtype (bfloat16 is not offered: ONNX Runtime has no CPU kernels for it)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--opset", type=int, default=FUNCTION_OPSET, help=f"ONNX opset (default {FUNCTION_OPSET})")
    p.add_argument("--random-weights", action="store_true",
                   help="build the named architecture from its config with random weights (no weight download)")
    p.add_argument("--calibration", help="calibration.json from sparsevlm-calibrate: profile buckets per segment")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_quiet_flag(p)
    add_verbose_flag(p)  # also logs each graph's export time and the peak memory so far
    return p


@command("sparsevlm-export")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    method_options = method_options_from_args(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if args.quiet:  # also transformers' "Loading weights" bar, so stderr holds only errors
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    manifests = export(args.model, args.out, budgets=method_budgets_from_args(args), dtype=args.dtype,
                       opset=args.opset, random_weights=args.random_weights, calibration=args.calibration,
                       overwrite=args.overwrite, progress=not args.quiet, **method_options)
    _summary(manifests)
    return 0


if __name__ == "__main__":
    sys.exit(main())
