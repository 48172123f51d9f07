"""The atlas's concepts view: features grouped by their map cluster (k-means of decoder directions),
each group named by the words its members' explanations share, or, where none is explained, by its
members' top tokens.

A cluster's words are ranked by how much more often they appear in its explanations than in the
explanations of all clusters (count in the cluster × log(clusters / clusters using the word)), so
words every explanation uses ("tokens", "text") do not name every group.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np

CONCEPT_WORDS = 8  # words naming a cluster
CONCEPT_MEMBERS = 12  # features listed per cluster (best scored first, then densest)
WORD = re.compile(r"[^\W\d_][\w'-]*[^\W_]|[^\W\d_]", re.UNICODE)
# Words that say nothing about a concept, in explanations of features.
STOPWORDS = frozenset("""
a an the and or of in on at to for from by with as is are was were be been being it its this that these those
which who whom what when where how not no nor but if then than so such any all each every some many much more
most other another same own only also very can could may might will would shall should do does did has have had
word words token tokens text texts phrase phrases mention mentions mentioned mentioning reference references
referring refer refers example examples marked marks context contexts feature features about like related
use used using usually often typically various different specific common commonly especially including include
""".split())


def explanation_words(text: str) -> list[str]:
    return [word for word in (match.lower() for match in WORD.findall(text or ""))
            if len(word) > 2 and word not in STOPWORDS]


def concepts_document(clusters: np.ndarray, mapped: np.ndarray, density: np.ndarray,
                      explanation_of: dict[int, str], detection_auc: dict[int, float],
                      top_tokens_of) -> dict:
    """The concepts file's content: per non-empty cluster, its size, naming words (and whether they come
    from explanations), mean detection AUC of its scored members, and up to :data:`CONCEPT_MEMBERS`
    members as [feature, explanation or ""]; ``top_tokens_of(feature)`` gives a feature's top token
    strings (the fallback names). Clusters are listed largest first."""
    ids = np.flatnonzero(mapped)
    order = np.lexsort((ids, clusters[ids]))
    ids = ids[order]
    starts = np.flatnonzero(np.diff(clusters[ids], prepend=-1)) if len(ids) else np.empty(0, np.int64)
    bounds = list(zip(starts.tolist(), [*starts[1:].tolist(), len(ids)], strict=True))
    counts_by_cluster, users = [], Counter()
    for start, stop in bounds:
        counts = Counter(word for feature in ids[start:stop].tolist() if feature in explanation_of
                         for word in set(explanation_words(explanation_of[feature])))
        counts_by_cluster.append(counts)
        users.update(counts.keys())
    groups = []
    for (start, stop), counts in zip(bounds, counts_by_cluster, strict=True):
        members = ids[start:stop]
        ranked = sorted(counts, key=lambda w: (-counts[w] * math.log((len(bounds) + 1) / users[w]), w))
        words, from_explanations = ranked[:CONCEPT_WORDS], bool(ranked)
        by_density = members[np.lexsort((members, -density[members]))]
        if not words:
            seen: dict[str, None] = {}
            for feature in by_density[:CONCEPT_MEMBERS].tolist():
                for token in top_tokens_of(feature):
                    if token.strip():
                        seen.setdefault(token.strip(), None)
            words = list(seen)[:CONCEPT_WORDS]
        scored = [detection_auc[f] for f in members.tolist() if f in detection_auc]
        best = sorted((f for f in members.tolist() if f in detection_auc), key=lambda f: (-detection_auc[f], f))
        listed = best[:CONCEPT_MEMBERS]
        listed += [f for f in by_density.tolist() if f not in set(listed)][:CONCEPT_MEMBERS - len(listed)]
        groups.append({"c": int(clusters[members[0]]), "size": len(members), "words": words,
                       "named_by": "explanations" if from_explanations else "top tokens",
                       "explained": sum(1 for f in members.tolist() if f in explanation_of),
                       "auc": round(float(np.mean(scored)), 3) if scored else None,
                       "members": [[f, explanation_of.get(f, "")] for f in listed]})
    groups.sort(key=lambda group: (-group["size"], group["c"]))
    return {"clusters": groups}
