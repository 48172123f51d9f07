"""Tokenising documents and cutting them into context windows that batch with little padding.

Every window holds tokens of one document only (a token's activation must depend only on its
own document), consecutive windows of a long document do not overlap, and nothing is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    doc_id: int
    start: int  # position of the window's first token in its document's token sequence
    token_ids: np.ndarray  # int32, document tokens only (a prepended BOS is not part of it)
    last: bool  # whether this window ends its document


def tokenize(tokenizer, documents: list[tuple[int, str]]) -> list[tuple[int, np.ndarray]]:
    """Token ids of each document, without special tokens (BOS is the harvester's policy)."""
    if not documents:
        return []
    encoded = tokenizer([text for _, text in documents], add_special_tokens=False,
                        return_attention_mask=False, verbose=False)["input_ids"]
    return [(doc_id, np.asarray(ids, dtype=np.int32)) for (doc_id, _), ids in zip(documents, encoded, strict=True)]


def split_windows(doc_tokens: list[tuple[int, np.ndarray]], window_tokens: int) -> list[Window]:
    windows = []
    for doc_id, ids in doc_tokens:
        for start in range(0, len(ids), window_tokens):
            windows.append(Window(doc_id, start, ids[start:start + window_tokens],
                                  last=start + window_tokens >= len(ids)))
    return windows


def group_by_length(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of windows grouped into batches of at most ``batch_tokens`` padded tokens.

    Windows are sorted longest first, so each batch pads only to lengths close to its own.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        padded_length = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * padded_length > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def chunk_windows(windows: list[Window], max_tokens: int) -> list[list[Window]]:
    """Consecutive runs of windows holding at most ``max_tokens`` tokens (at least one window)."""
    chunks: list[list[Window]] = []
    current: list[Window] = []
    tokens = 0
    for window in windows:
        if current and tokens + len(window.token_ids) > max_tokens:
            chunks.append(current)
            current, tokens = [], 0
        current.append(window)
        tokens += len(window.token_ids)
    if current:
        chunks.append(current)
    return chunks
