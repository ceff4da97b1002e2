"""LAReQA-native hard negatives: another sentence of the gold sentence's own paragraph.

In the LAReQA pool the other sentences of the gold paragraph are the hardest confusers (same
topic, same entities, same language as the gold one); random in-batch negatives almost never
include them. `data.hard_negatives=paragraph` gives every training pair all of them, in the
passage's language (each language row of a pair draws from its own paragraph, so a cross-lingual
batch gets its negatives in the passage language); training uses the first
`train.hard_negatives_per_pair`. The list starts at a stable hash of the question id, so every
run, worker and resume sees the same negatives, and the first is the one a single-negative run
always used. A one-sentence paragraph borrows from the rest of its article; a one-sentence
article has none (then hard negatives are off for the whole dataset, as for any input with a
missing `hard_negative`).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import replace

import pyarrow as pa

from raysys.data.lareqa import LareqaCorpus

def _stable_index(key: str, modulo: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % modulo


def with_paragraph_negatives(corpus: LareqaCorpus) -> LareqaCorpus:
    """The corpus with `pairs.hard_negative` filled from the gold paragraph: the other sentences,
    rotated to start at the question's stable choice (pairs and questions are row-aligned: both
    are built question by question)."""
    cand_lang = corpus.candidates.column("lang").to_pylist()
    cand_text = corpus.candidates.column("text").to_pylist()
    cand_paragraph = corpus.candidates.column("paragraph").to_pylist()
    cand_group = corpus.candidates.column("group").to_pylist()
    by_paragraph, by_article = defaultdict(list), defaultdict(list)
    for cand, (lang, paragraph, group) in enumerate(zip(cand_lang, cand_paragraph, cand_group)):
        by_paragraph[(lang, paragraph)].append(cand)
        by_article[(lang, group)].append(cand)
    negatives = []
    for qid, gold in zip(corpus.questions.column("id").to_pylist(), corpus.questions.column("gold_cand_id").to_pylist()):
        key = (cand_lang[gold], cand_paragraph[gold])
        others = [c for c in by_paragraph[key] if c != gold] or \
                 [c for c in by_article[(cand_lang[gold], cand_group[gold])] if c != gold]
        if not others:
            negatives.append(None)
            continue
        start = _stable_index(qid, len(others))
        negatives.append([cand_text[c] for c in others[start:] + others[:start]])
    column = corpus.pairs.schema.get_field_index("hard_negative")
    return replace(corpus, pairs=corpus.pairs.set_column(column, "hard_negative",
                                                         pa.array(negatives, pa.list_(pa.string()))))
