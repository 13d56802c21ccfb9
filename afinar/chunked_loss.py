"""Cross-entropy through a frozen LM head, in chunks of tokens, without keeping the logits.

With a 128k vocabulary, the logits of a 32k-token step take 16 GiB in fp32, and autograd would keep them
(and their softmax) for the backward pass. The head is frozen, so the only gradient needed is the one of
the hidden states, (softmax - onehot) @ W: it is computed chunk by chunk during the forward pass and
only scaled in the backward pass. Memory: one chunk of logits at a time.
"""

from __future__ import annotations

import torch

CHUNK_TOKENS = 4096


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            part = hidden[start:start + chunk]
            wanted = targets[start:start + chunk]
            logits = (part @ weight.t()).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, wanted[:, None]).squeeze(1)).sum()
            if grad is not None:
                probs = logits.sub_(log_norm[:, None]).exp_()  # in place: the chunk's only big buffer
                probs[torch.arange(len(wanted), device=probs.device), wanted] -= 1.0
                grad[start:start + chunk] = probs.to(part.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None


def head_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Sum over tokens of -log softmax(hidden @ weight.T)[target]; `weight` must be frozen."""
    if weight.requires_grad:
        raise ValueError("head_cross_entropy_sum needs a frozen LM head (no gradient for its weight)")
    return _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, chunk)
