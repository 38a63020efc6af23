"""Token counts and FLOPs of a run, as `docs/accounting.md` defines them for users.

Per decoder layer the authors count 4*n*d^2 + 2*n^2*d + 3*n*d*m multiply-accumulates,
with n the full sequence length at the layer input (LM head and ViT excluded). Token
counts are reported under both conventions: SparseVLM's "equal tokens" (the visual count
*after* pruning is charged to the pruning layer itself) and the mean of the per-layer
*input* visual counts (what each layer really processes).
"""

from __future__ import annotations

from .spec import ModelSpec


def layer_flops(n: int, hidden: int, intermediate: int) -> int:
    return 4 * n * hidden ** 2 + 2 * n * n * hidden + 3 * n * hidden * intermediate


def visual_counts_per_layer(num_layers: int, start: int, changes: dict[int, int]) -> tuple[list[int], list[int]]:
    """(visual count at each layer's input, count charged per layer by the code convention),
    for a run starting with `start` visual tokens where layer l's output has changes[l]."""
    inputs, outputs, count = [], [], start
    for layer in range(num_layers):
        inputs.append(count)
        count = changes.get(layer, count)
        outputs.append(count)
    return inputs, outputs


def run_accounting(spec: ModelSpec, text_tokens: list[int], decisions: list, method: str,
                   visual_tokens: list[int] | None = None) -> dict:
    """Per batch row: equal tokens (both conventions), FLOPs pruned and unpruned, for the
    language model `spec` describes (its layers, hidden and MLP widths, visual tokens).

    text_tokens: per row, the prompt tokens that are not visual. decisions: the prefill's
    LayerDecision list (FasterVLM's layer -1 applies before the LLM). visual_tokens: per row,
    its image's visual count (anyres images differ; default: the spec's num_visual)."""
    num_layers, hidden, intermediate = spec.num_layers, spec.hidden_size, spec.intermediate_size
    if visual_tokens is None:
        visual_tokens = [spec.num_visual] * len(text_tokens)
    rows = []
    for row, text in enumerate(text_tokens):
        num_visual = start = visual_tokens[row]
        changes = {}
        for d in decisions:
            if d.layer < 0:
                start = d.keep_count[row]
            else:
                changes[d.layer] = d.keep_count[row] + d.recycled[row]
        inputs, charged = visual_counts_per_layer(num_layers, start, changes)
        flops = sum(layer_flops(text + v, hidden, intermediate) for v in inputs)
        base = num_layers * layer_flops(text + num_visual, hidden, intermediate)
        rows.append({"equal_tokens": sum(charged) / num_layers,
                     "mean_layer_input_tokens": sum(inputs) / num_layers,
                     "visual_per_layer_input": inputs,
                     "flops": flops, "flops_unpruned": base, "flops_ratio": flops / base})
    return {"method": method, "rows": rows}
