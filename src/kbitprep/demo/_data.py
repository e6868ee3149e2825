"""The demo's corpus and its token blocks: the training windows and the held-out blocks."""

from __future__ import annotations

import importlib.resources
from typing import Any

import torch

__all__ = ["CORPUS_FILE", "HELD_OUT_EVERY", "corpus", "held_out_blocks", "tokenize", "train_windows"]

CORPUS_FILE = "keepers_log.txt"
HELD_OUT_EVERY = 5  # every 5th paragraph of the corpus is held out


def corpus() -> tuple[str, str]:
    """The demo corpus (package data ``kbitprep/data/keepers_log.txt``, written for kbitprep),
    split by paragraph: every fifth paragraph is held out. Returns ``(train_text, held_out_text)``."""
    text = importlib.resources.files("kbitprep").joinpath("data", CORPUS_FILE).read_text(encoding="utf-8")
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    train = [p for i, p in enumerate(paragraphs) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [p for i, p in enumerate(paragraphs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return "\n\n".join(train) + "\n", "\n\n".join(held) + "\n"


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D int64 tensor (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def held_out_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping ``(n, seq_len)`` blocks of ``ids``; one shorter block when ``ids`` is short."""
    n = ids.numel() // seq_len
    if n == 0:
        return ids.unsqueeze(0)
    return ids[: n * seq_len].view(n, seq_len)


def train_windows(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """A ``(batch_size, seq_len)`` batch of windows of ``ids`` at random starts drawn from ``generator``."""
    starts = torch.randint(0, ids.numel() - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
