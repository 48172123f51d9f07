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


@dataclass(frozen=True)
class Piece:
    """Consecutive tokens of one document, starting at a window boundary: the whole document, or
    the part of a long one that one shard holds."""

    doc_id: int
    start: int  # position of the first token in its document
    token_ids: np.ndarray  # int32
    last: bool  # whether the piece ends its document


def split_windows(doc_tokens: list[tuple[int, np.ndarray]], window_tokens: int) -> list[Window]:
    """Windows of whole documents."""
    return piece_windows([Piece(doc_id, 0, ids, True) for doc_id, ids in doc_tokens], window_tokens)


def piece_windows(pieces: list[Piece], window_tokens: int) -> list[Window]:
    windows = []
    for piece in pieces:
        ids = piece.token_ids
        for offset in range(0, len(ids), window_tokens):
            windows.append(Window(piece.doc_id, piece.start + offset, ids[offset:offset + window_tokens],
                                  last=piece.last and offset + window_tokens >= len(ids)))
    return windows


def document_pieces(doc_tokens: list[tuple[int, np.ndarray]], window_ranges: dict[int, tuple[int, int]],
                    window_tokens: int) -> list[Piece]:
    """Pieces of tokenised documents: whole, or the [first, end) windows (end -1: to the end) that
    ``window_ranges`` names for a document split between shards."""
    pieces = []
    for doc_id, ids in doc_tokens:
        first_window, end_window = window_ranges.get(doc_id, (0, -1))
        start = first_window * window_tokens
        end = len(ids) if end_window < 0 else min(len(ids), end_window * window_tokens)
        if start < end or (start == 0 and not len(ids)):
            pieces.append(Piece(doc_id, start, ids[start:end], last=end >= len(ids)))
    return pieces


# A batch pads every window to its longest: a window shorter than this share of it starts a new
# batch, so padding never costs more than 1/8 of a batch (each document's last, shorter window
# would otherwise ride along with full ones).
MIN_FILL = 7 / 8


def group_by_length(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices of windows grouped into batches of at most ``batch_tokens`` padded tokens.

    Windows are sorted longest first, and a batch takes only windows at least ``MIN_FILL`` of its
    first window's length, so each batch pads little.
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        padded_length = lengths[current[0]] if current else lengths[index]
        if current and ((len(current) + 1) * padded_length > batch_tokens
                        or lengths[index] < MIN_FILL * padded_length):
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
