"""8-bit weights for the torch engine: `weights="int8"` (symmetric, one scale per output channel) or
`weights="fp8"` (E4M3, one scale per output channel), and the numbers the build's accuracy gate uses.

A decode step at the batch sizes a server runs is bound by reading the weights (docs/gpu-engine.md),
so halving their bytes is what speeds it up; the products stay in bf16/fp16 arithmetic (W8A16), which
keeps the error to the weights' rounding alone (what the build's accuracy gate measures,
`fake_quantize`). INT8 keeps 8 bits of precision over a row's range, E4M3 3 mantissa bits at every
magnitude: on stories260K the INT8 rounding costs +0.03 % of perplexity and FP8's +2.0 %
(docs/quantization.md). FP8 products of many rows may also round their activations (W8A8,
`quantize_rows_fp8`; `fake_quantize(activations=True)` models it). `QuantWeight` and `DenseWeight`
(a weight kept in the engine's dtype) are the operands of the products (matmul.py).
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
WEIGHT_FORMATS = ("dtype", "int8", "fp8")


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(8-bit weight [N, K], float32 scale [N]): row n is w[n] / scale[n], scale[n] = max|w[n]| / the
    format's largest value (127 for int8, rounded to nearest; 448 for fp8 E4M3)."""
    if fmt == "fp8":
        return quantize_fp8(w)
    if fmt != "int8":
        raise ValueError(f"unknown weight format {fmt!r} (expected int8 or fp8)")
    wf = w.detach().float()
    scale = (wf.abs().amax(1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight [N, K], float32 scale [N]): row n is w[n] / scale[n], scale[n] = max|w[n]| / 448."""
    wf = w.detach().float()
    scale = (wf.abs().amax(1) / E4M3_MAX).clamp(min=1e-12)
    q = (wf / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 rows [M, K], float32 scale [M, 1]): row m is x[m] / scale[m], scale[m] = max|x[m]| / 448 —
    the activations of a W8A8 product (the `fp8_rows` kernel computes the same numbers)."""
    xf = x.detach().float()
    # divided by a tensor, not the number 448: on CUDA torch turns a division by a Python scalar into a
    # product with its reciprocal, one rounding off the kernels' IEEE division in some rows' scales
    amax = xf.abs().amax(-1, keepdim=True)
    scale = (amax / amax.new_tensor(E4M3_MAX)).clamp(min=1e-12)
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def w8a8_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Can FP8 products run as W8A8 on `device` (`torch._scaled_mm` with a scale per row and per
    output channel, bf16 out: Hopper on)? A tiny product tells."""
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_scaled_mm") \
            or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        a = torch.zeros((16, 32), device=device, dtype=torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones((16, 1), device=device),
                         scale_b=torch.ones((1, 16), device=device), out_dtype=torch.bfloat16)
        return True
    except Exception:  # noqa: BLE001 - this torch or card has no row-wise scaled product
        return False


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


class QuantWeight:
    """A linear layer's weight in 8 bits (`q` [N, K] int8 or float8_e4m3fn, `scale` [N]) and the dtype
    its products return: an operand of `W8Matmul`."""

    __slots__ = ("q", "scale", "dtype")
    dense = False

    def __init__(self, w: torch.Tensor, fmt: str, dtype: torch.dtype):
        self.q, self.scale = quantize(w, fmt)
        self.dtype = dtype

    @property
    def fmt(self) -> str:
        """The weights' format, as `WEIGHT_FORMATS` names it."""
        return "fp8" if self.q.dtype == torch.float8_e4m3fn else "int8"

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def widened(self) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.dtype)


class DenseWeight(QuantWeight):
    """A weight kept in the engine's dtype (`q` is the weight itself, no scale), a `W8Matmul` operand
    so that the products where the kernel beats cuBLAS take it (matmul.py)."""

    __slots__ = ()
    dense = True

    def __init__(self, w: torch.Tensor):
        self.q, self.scale, self.dtype = w, None, w.dtype

    @property
    def fmt(self) -> str:
        return "dtype"

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size()

    def widened(self) -> torch.Tensor:
        return self.q


def fake_quantize(model, fmt: str, activations: bool = False) -> int:
    """Round every linear weight of the decoder layers and the LM head through `fmt` (in place, in
    the model's dtype): the numbers the engine's 8-bit products use. Returns how many were rounded.
    The embedding lookup keeps its weights (the engine keeps them in its dtype too). `activations`
    (fp8): each of those products also rounds its input per row (`quantize_rows_fp8`, a forward
    pre-hook): the W8A8 products' numbers."""
    n = 0
    inner = model.model
    head = model.get_output_embeddings()
    tied = head.weight is inner.embed_tokens.weight
    if activations and fmt != "fp8":
        raise ValueError(f"activations are rounded for fp8 products only, not {fmt!r}")
    with torch.no_grad():
        mods = [mod for layer in inner.layers
                for mod in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)]
        for mod in mods:
            mod.weight.copy_(dequantize(*quantize(mod.weight, fmt), mod.weight.dtype))
            n += 1
        if tied:  # the engine rounds its own copy of the head; the lookup keeps the exact rows
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        head.weight.copy_(dequantize(*quantize(head.weight, fmt), head.weight.dtype))
        n += 1
    if activations:
        for mod in mods + [head]:
            mod.register_forward_pre_hook(_round_input_rows)
    return n


def _round_input_rows(_module, args):
    x = args[0]
    q, scale = quantize_rows_fp8(x.reshape(-1, x.shape[-1]))
    return ((q.float() * scale).to(x.dtype).reshape(x.shape),) + tuple(args[1:])


