"""The one Arrow schema of a parallel QA item, shared by every loader.

A row is one language version of one parallel item: rows with the same `id` in different
languages are translations of each other (the parallel link hybrid batching relies on).
"""

from __future__ import annotations

import pyarrow as pa

PAIR_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),        # parallel id, shared across languages
    pa.field("lang", pa.string(), nullable=False),      # ISO 639-1 code
    pa.field("query", pa.string(), nullable=False),
    pa.field("passage", pa.string(), nullable=False),   # the positive (LAReQA: gold sentence)
    pa.field("hard_negative", pa.list_(pa.string())),   # optional: hard negatives, in order of use
    pa.field("context", pa.string()),                   # optional (LAReQA: the paragraph)
    pa.field("group", pa.string(), nullable=False),     # split key (article title / id)
    pa.field("origin", pa.string(), nullable=False),    # "file:row" for precise error messages
])

REQUIRED_COLUMNS = ("id", "lang", "query", "passage")
