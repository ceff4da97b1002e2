"""A small MIRACL-style directory (two languages, 12 passages and 3 topics each) for evaluation tests."""

import json
from pathlib import Path


def write_miracl(root: Path) -> Path:
    for lang in ("de", "en"):
        d = root / lang
        d.mkdir(parents=True)
        docs = {f"{lang}-d{i}": f"{lang} document number {i} about topic {i % 3}" for i in range(12)}
        (d / "corpus.jsonl").write_text("\n".join(json.dumps({"docid": k, "title": "", "text": v})
                                                  for k, v in docs.items()), encoding="utf-8")
        (d / "topics.tsv").write_text("\n".join(f"q{i}\t{lang} topic {i}" for i in range(3)), encoding="utf-8")
        (d / "qrels.tsv").write_text("\n".join(f"q{i} Q0 {lang}-d{i} 1" for i in range(3)), encoding="utf-8")
    return root
