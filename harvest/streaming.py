"""Streamed plans: the driver reads the corpus in order, tokenises it and cuts shards as it goes.

Used where nothing can be counted up front (a streaming dataset, compressed files) or where the
budget is in tokens (``corpus.max_tokens``, which only tokenising in order can honour exactly).
The cut is a pure function of the stream and the plan's knobs, so a resume reads the same stream
again, gets the same shards and skips the committed ones. Shards travel to the actors already
tokenised; reading and tokenising text costs a small fraction of a forward pass, so one reader
keeps many actors busy.
"""

from __future__ import annotations

from collections.abc import Iterator

from lexica.harvest import packing
from lexica.harvest.config import CorpusConfig
from lexica.harvest.corpus import ShardDocuments, ShardPlan, iter_rows, row_text


def stream_shards(plan: ShardPlan, corpus: CorpusConfig, tokenizer,
                  storage_options: dict | None = None) -> Iterator[tuple[int, ShardDocuments]]:
    """(shard index, its documents as token pieces) for every shard of a streamed plan, in order."""
    window = max(plan.window_tokens, 1)
    tokens_left = plan.max_tokens
    index = 0
    shard = ShardDocuments(documents=[], pieces=[])
    used = 0
    for doc_id, raw, source, row in iter_rows(plan, corpus, storage_options):
        if plan.docs_per_shard and doc_id >= (index + 1) * plan.docs_per_shard:
            yield index, shard
            index, shard, used = index + 1, ShardDocuments(documents=[], pieces=[]), 0
        text = row_text(raw, source, row, corpus, shard)
        if text is None:
            continue
        ids = packing.tokenize(tokenizer, [(doc_id, text)])[0][1]
        if not len(ids):
            shard.empty += 1
            continue
        if tokens_left is not None:
            ids = ids[:tokens_left]
            tokens_left -= len(ids)
        start = 0
        while start < len(ids):
            if plan.docs_per_shard:
                take = len(ids)
            else:
                room = (plan.shard_tokens - used) // window * window
                if room < 1:
                    yield index, shard
                    index, shard, used = index + 1, ShardDocuments(documents=[], pieces=[]), 0
                    continue
                take = min(len(ids) - start, room)
            shard.pieces.append(packing.Piece(doc_id, start, ids[start:start + take], last=start + take >= len(ids)))
            used += take
            start += take
        if tokens_left == 0:
            break
    if shard.pieces or shard.empty or shard.invalid_utf8 or index == 0:
        yield index, shard
