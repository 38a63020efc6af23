"""Linear layers with oneDNN-packed weights, for the torch backend on the CPU.

`torch.nn.Linear` on the CPU multiplies by the row-major weight through MKL. At the few
hundred or few dozen rows a pruned prefill leaves (FasterVLM 95 % keeps 29 of 576 visual
tokens), that GEMM runs well below its large-matrix throughput, so the time stops following
the FLOPs: measured on the 2-core CI machine, a LLaVA-shaped decoder layer (hidden 1024) at
61 tokens took 0.17 of its 608-token time with `nn.Linear` and 0.11 with the packed weights
below (the tokens' ratio is 0.10). oneDNN reorders a weight once into the blocked layout its
GEMM kernels read (`torch.ops.mkldnn._reorder_linear_weight`) and multiplies without
converting the activations (`torch.ops.mkldnn._linear_pointwise`): the pair torch's own
compiler (inductor, freezing) puts in place of `nn.Linear` on the CPU. It computes the same
product (float32 sums in another order: within 1e-5 relative of `nn.Linear`). Both ops are
torch-internal (underscored): where a torch build lacks them, `packing_supported` is False and
the model runs on `nn.Linear` as before.

`with_packed_linears(model)` returns a copy of the module tree that shares every tensor with
`model` except the linear weights, which it holds packed; `model` itself is left as it was
(the exporter traces `nn.Linear`, never these). The copy costs one more copy of the linear
weights while `model` is alive: the runtime packs a checkpoint it loaded for itself and drops
the original.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def packing_supported(model: nn.Module) -> bool:
    """oneDNN packing applies: float32 weights on the CPU, and this torch has the ops."""
    weight = next(model.parameters(), None)
    return (weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """`nn.Linear`'s forward with the weight held in oneDNN's packed layout (read-only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # "none": no fused activation after the product
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def with_packed_linears(model: nn.Module) -> nn.Module:
    """`model`'s module tree with every `nn.Linear` replaced by a `PackedLinear`, sharing all
    other parameters and buffers with `model` (unchanged). Returns `model` itself where packing
    does not apply (`packing_supported`: other devices, other dtypes)."""
    if not packing_supported(model):
        return model
    shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    packed = copy.deepcopy(model, memo=shared)  # new modules, the same tensors
    for parent in list(packed.modules()):
        for name, child in list(parent.named_children()):
            # exactly nn.Linear (subclasses may change forward), float32 on the CPU (a model
            # may hold other dtypes in places)
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu":
                setattr(parent, name, PackedLinear(child))
    return packed
