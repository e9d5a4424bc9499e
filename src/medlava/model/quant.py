"""Weight-only quantization of the decoder's linear layers: int8 and int4, for the CPU.

- int8: symmetric, one scale per output channel. A few rows (decode of a small batch, where
  reading the weights is the cost) go through torch's int8-weight GEMM (`_weight_int8pack_mm`,
  which reads a quarter of float32's bytes and half of bfloat16's); more rows (prefill, large
  batches) dequantize the weight to the activations' dtype in one pass (medlava's
  `dequantize_int8` kernel) and run the usual GEMM, since `_weight_int8pack_mm` is 2-3x slower
  there. torchao has no int8 CPU kernel of its own.
- int4: torchao's CPU path (`Int4OpaqueTensor`: asymmetric groups of 128 (or 64, 32 where the
  input width needs), torch's tinygemm CPU kernel `_weight_int4pack_mm_for_cpu`).

Both torch kernels are vectorised for bfloat16 activations only (float32 ones run 10-30x
slower), so a float32 model's quantized layers hand them their input in bfloat16 (a rounding far
below the weights' own) and take the output back in float32.

Only the decoder layers' projections are quantized (the bulk of a 7B model); embeddings, the LM
head, the vision tower and the projector keep the model's dtype. The loader builds these layers
empty and quantizes each weight as it reads it (`QuantizedLinear.load_weight`), so the
full-precision model never exists in memory at once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from medlava import kernels
from medlava.errors import MedlavaError

QUANTIZATIONS = ("int8", "int4")
INT8_FEW_ROWS = 8  # up to this many rows, _weight_int8pack_mm; above, dequantize and GEMM (docs/BENCHMARKS.md)
INT4_GROUP_SIZES = (128, 64, 32)  # the first that divides the input width is used
KERNEL_DTYPE = torch.bfloat16  # the activations the int8 and int4 kernels are fast for


def int4_tensor_type():
    """torchao's CPU int4 weight (imported quietly: torchao logs at import about its CUDA-only libraries)."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
    except ImportError:
        raise MedlavaError("--quantization int4 needs torchao (pip install torchao)") from None
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)
    return Int4OpaqueTensor


def check_quantization(name: str | None) -> str | None:
    if name is not None and name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}: use {' or '.join(QUANTIZATIONS)}")
    return name


class QuantizedLinear(nn.Module):
    """A bias-optional linear layer whose weight is stored int8 or int4 (see the module docstring).

    Inference runs the quantized kernels. With autograd on (relevance maps) an int8 weight is
    dequantized, so gradients reach the input as through the full-precision layer; int4's kernel
    has no gradient, which is said in one line."""

    def __init__(self, in_features: int, out_features: int, method: str, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.method, self.dtype = in_features, out_features, method, dtype
        check_quantization(method)
        if method == "int4" and (in_features % 32 or out_features % 16):  # torch's int4 CPU packing
            raise ValueError(f"int4 needs input widths divisible by 32 and output widths by 16, got {in_features}->{out_features}")
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.qweight: torch.Tensor | None = None  # int8 [out, in], or torchao's packed int4 tensor
        self.scales: torch.Tensor | None = None  # int8: [out] float32, for dequantizing
        self.kernel_scales: torch.Tensor | None = None  # int8: the same in KERNEL_DTYPE, for _weight_int8pack_mm

    @property
    def group_size(self) -> int:
        return next(g for g in INT4_GROUP_SIZES if self.in_features % g == 0)

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a full-precision weight [out, in] into this layer (the original is not kept)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for a {self.in_features}->{self.out_features} layer")
        w = weight.to(torch.float32)
        if self.method == "int8":
            scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
            self.qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            self.scales, self.kernel_scales = scale, scale.to(KERNEL_DTYPE)
        else:
            self.qweight = int4_tensor_type().from_hp(w.to(KERNEL_DTYPE), [1, self.group_size])

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The int8 weight as `dtype` [out, in]."""
        ops = kernels.ops()
        if ops is not None:
            return ops.dequantize_int8(self.qweight, self.scales, dtype)
        return (self.qweight.to(torch.float32) * self.scales[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is None:
            raise RuntimeError("this quantized layer was never given its weight")
        if self.method == "int4":
            if torch.is_grad_enabled():
                raise MedlavaError("int4 layers have no gradients (relevance maps need them): use occlusion maps "
                                   "or load the model without --quantization int4")
            y = F.linear(x.to(KERNEL_DTYPE), self.qweight).to(x.dtype)
            return y if self.bias is None else y + self.bias
        rows = x.numel() // x.shape[-1]
        if torch.is_grad_enabled() or rows > INT8_FEW_ROWS:
            return F.linear(x, self.dequantized(x.dtype), self.bias)
        y = torch._weight_int8pack_mm(x.reshape(rows, -1).to(KERNEL_DTYPE), self.qweight, self.kernel_scales)
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, {self.method}, bias={self.bias is not None}"

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weight and its scales (int4: packed values, a scale and a zero per group)."""
        n, k, low = self.out_features, self.in_features, torch.empty((), dtype=KERNEL_DTYPE).element_size()
        if self.method == "int8":
            return n * k + n * (4 + low)
        return n * k // 2 + (k // self.group_size) * n * 2 * low


def quantized_layers(model: nn.Module, method: str, dtype: torch.dtype) -> dict[str, QuantizedLinear]:
    """Replace every projection of the decoder's layers by an empty QuantizedLinear; returns them by
    the checkpoint name of their weight (what `QuantizedLinear.load_weight` is to receive)."""
    from medlava.model.decoder import DecoderLayer, Linear

    out = {}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, DecoderLayer):
            continue
        for name, m in list(layer.named_modules()):
            if isinstance(m, Linear):
                parent_name, _, attr = name.rpartition(".")
                q = QuantizedLinear(m.in_features, m.out_features, method, m.bias is not None, dtype)
                setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, q)
                out[f"{layer_name}.{name}.weight"] = q
    return out


def weight_bytes(cfg, dtype: torch.dtype, quantization: str | None = None) -> int:
    """Bytes a model's weights take in memory (not its KV cache), counted from the parameter shapes
    of `cfg` (a LlavaConfig) on the meta device: nothing is allocated, so a 7B model's figure costs nothing."""
    from medlava.model.llava import LlavaModel

    with torch.device("meta"):
        model = LlavaModel(cfg).to(dtype)
        layers = quantized_layers(model, quantization, dtype) if quantization else {}
    params = {id(p): p for p in model.parameters()}  # a tied LM head counts once
    return sum(p.numel() * p.element_size() for p in params.values()) + sum(q.nbytes for q in layers.values())
