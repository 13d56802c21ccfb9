"""FP8 matmuls for the frozen base of a LoRA model, on GPUs with FP8 tensor cores and row-wise scaling (Hopper).

LoRA never changes the base weights, so each one is quantized once to e4m3 with one scale per output row
(for the forward) and once more with one scale per input column (for the backward's input gradient; a frozen
base needs no weight gradient). Activations and output gradients get one scale per token, computed on the
fly; inside the compiled layers that quantization fuses with the element-wise work next to it. The matmuls
run through torch._scaled_mm with a bf16 result. The LoRA matrices, norms, attention and the loss stay in
bf16, so the adapter learns in the same precision as before: only the frozen base's products are rounded
(e4m3 keeps 3 mantissa bits, finer than the 16 levels of nf4 that QLoRA already rounds those weights to).

Hopper runs e4m3 matmuls at twice the bf16 rate; the frozen projections are ~70 % of the matmul work of a
LoRA step at Llama-3.2-1B shape (the rest is the LM head inside TRL's loss, left in bf16).
"""

from __future__ import annotations

import math

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
MIN_CAPABILITY = (9, 0)  # row-wise scaled e4m3 matmuls: Hopper and newer
# The check against bf16 on real rows of the user's data: a larger relative change of the loss means the
# model has activations e4m3 represents badly (outlier channels), and training falls back to bf16.
MAX_LOSS_DRIFT = 0.01


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, K) -> e4m3 (M, K) and fp32 scales (M, 1), one per row: t ≈ q * scale."""
    rows = t.reshape(-1, t.shape[-1])
    amax = rows.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (rows.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def _scaled_matmul(rows: torch.Tensor, weight8: torch.Tensor, weight_scale: torch.Tensor, out_dtype,
                   fast_accum: bool) -> torch.Tensor:
    """rows (M, K) @ weight8.T, weight8 (N, K) e4m3 with scales (1, N)."""
    q, scale = quantize_rows(rows)
    return torch._scaled_mm(q, weight8.t(), scale_a=scale, scale_b=weight_scale, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


class _FrozenFp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight8, weight_scale, weight8_t, weight_t_scale):
        ctx.save_for_backward(weight8_t, weight_t_scale)
        ctx.input_shape = x.shape
        # Fast accumulation in the forward, exact accumulation for gradients: the split torchao uses too.
        out = _scaled_matmul(x, weight8, weight_scale, x.dtype, fast_accum=True)
        return out.reshape(*x.shape[:-1], weight8.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        weight8_t, weight_t_scale = ctx.saved_tensors
        grad_in = _scaled_matmul(grad_out, weight8_t, weight_t_scale, grad_out.dtype, fast_accum=False)
        return grad_in.reshape(ctx.input_shape), None, None, None, None


class Fp8FrozenLinear(nn.Module):
    """A frozen nn.Linear whose products run in e4m3; it keeps the original layer to switch back."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.original = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        weight8, scale = quantize_rows(weight)
        weight8_t, scale_t = quantize_rows(weight.t().contiguous())
        # Buffers, not parameters, and not saved: the adapter file and the optimizer never see them.
        self.register_buffer("weight8", weight8, persistent=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous(), persistent=False)
        self.register_buffer("weight8_t", weight8_t, persistent=False)
        self.register_buffer("weight_t_scale", scale_t.reshape(1, -1).contiguous(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # PEFT reads the base layer's weight for its dtype and device
        return self.original.weight

    @property
    def bias(self):
        return self.original.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenFp8Matmul.apply(x, self.weight8, self.weight_scale, self.weight8_t, self.weight_t_scale)
        return out if self.original.bias is None else out + self.original.bias


def supported(capability: str | None) -> bool:
    if not capability:
        return False
    major, minor = (int(part) for part in capability.split("."))
    return (major, minor) >= MIN_CAPABILITY


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def use_fp8_base_(model) -> int:
    """Swap the frozen base Linear under every LoRA layer for its e4m3 version; returns how many."""
    swapped = 0
    for layer in _lora_layers(model):
        base = layer.base_layer
        if type(base) is nn.Linear and base.in_features % 16 == 0 and base.out_features % 16 == 0:
            layer.base_layer = Fp8FrozenLinear(base)
            swapped += 1
    return swapped


def use_bf16_base_(model) -> int:
    """Undo use_fp8_base_: every LoRA layer gets its original base Linear back."""
    restored = 0
    for layer in _lora_layers(model):
        if isinstance(layer.base_layer, Fp8FrozenLinear):
            layer.base_layer = layer.base_layer.original
            restored += 1
    return restored


@torch.no_grad()
def loss_drift(model, rows: list[dict]) -> tuple[float, float]:
    """Mean loss of `rows` (tokenized examples with labels) with the e4m3 base and with the original one.

    Called before the layers are compiled, on a model with the e4m3 base; leaves it so, with the same
    quantized modules (quantizing every weight again would be wasted work).
    """
    def mean_loss() -> float:
        losses = []
        for row in rows:
            ids = torch.tensor([row["input_ids"]], device=device)
            labels = torch.tensor([row["labels"]], device=device)
            losses.append(float(model(input_ids=ids, labels=labels).loss))
        return sum(losses) / len(losses)

    device = next(p.device for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            fp8_loss = mean_loss()
            quantized = [(layer, layer.base_layer) for layer in _lora_layers(model)
                         if isinstance(layer.base_layer, Fp8FrozenLinear)]
            use_bf16_base_(model)
            bf16_loss = mean_loss()
            for layer, base in quantized:
                layer.base_layer = base
    finally:
        model.train(was_training)
    return fp8_loss, bf16_loss


def relative_drift(fp8_loss: float, bf16_loss: float) -> float:
    if not (math.isfinite(fp8_loss) and math.isfinite(bf16_loss)):
        return float("inf")
    return abs(fp8_loss - bf16_loss) / max(abs(bf16_loss), 1e-6)

