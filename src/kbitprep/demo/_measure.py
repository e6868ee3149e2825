"""What the demo measures: parameter bytes, peak memory, the held-out loss, and which LoRA
parameters received a gradient."""

from __future__ import annotations

import sys

import torch
from torch import nn

from kbitprep._storage import model_param_bytes as param_bytes

__all__ = ["lora_gradient_check", "mean_loss", "param_bytes", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``getrusage``; psutil's current RSS
    where ``resource`` is missing, i.e. Windows)."""
    try:
        import resource
    except ImportError:
        import psutil

        return int(psutil.Process().memory_info().rss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token loss over ``blocks``; eval mode, no grad (an inference call)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size]
            out = model(input_ids=batch, labels=batch, use_cache=False)
            tokens = batch.numel() - batch.shape[0]
            total += float(out.loss) * tokens
            count += tokens
    model.train(was_training)
    return total / count


def lora_gradient_check(model: nn.Module) -> tuple[list[str], list[str]]:
    """Which LoRA parameters received a gradient in the backward pass just run.

    A parameter counts when its ``.grad`` is set, finite and nonzero, except a ``lora_A`` whose
    ``lora_B`` partner is all zeros (peft's default initialisation at the first step): its exact
    gradient is zero, so it counts when its gradient is set and the partner's gradient is nonzero.

    Returns:
        ``(names, names_with_grad)``.
    """
    params = {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    live: set[str] = set()
    for name, p in params.items():
        g = p.grad
        if g is not None and bool(torch.isfinite(g).all()) and bool(g.count_nonzero() > 0):
            live.add(name)
    ok = set(live)
    for name, p in params.items():
        if name in live or p.grad is None or not bool(torch.isfinite(p.grad).all()) or "lora_A" not in name:
            continue
        partner = name.replace("lora_A", "lora_B")
        q = params.get(partner)
        if q is not None and partner in live and not bool(q.detach().count_nonzero() > 0):
            ok.add(name)
    return list(params), [n for n in params if n in ok]
