"""A small synthetic LAReQA directory (3 languages) with known structure, for protocol tests."""

from __future__ import annotations

import json
from pathlib import Path

LANGS = ("de", "en", "fr")


def write_synthetic_lareqa(root: Path, articles: int = 2, paragraphs: int = 2, sentences: int = 3,
                           langs=LANGS, missing: set[tuple[str, str]] | None = None) -> Path:
    """Each paragraph has `sentences` sentences and one question per sentence (gold = that sentence).

    Question ids are shared across languages; `missing` drops (lang, id) questions (partial
    parallelism, as in MLQA-R).
    """
    root.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        data = []
        for a in range(articles):
            pars = []
            for p in range(paragraphs):
                sents = [f"{lang} article {a} paragraph {p} sentence {s}." for s in range(sentences)]
                context, breaks = "", []
                for s in sents:
                    breaks.append([len(context), len(context) + len(s)])
                    context += s + " "
                qas = []
                for s, (b, _) in enumerate(breaks):
                    qid = f"a{a}p{p}s{s}"
                    if missing and (lang, qid) in missing:
                        continue
                    qas.append({"id": qid, "question": f"{lang} question about {a} {p} {s}?",
                                "answers": [{"text": sents[s][:5], "answer_start": b}]})
                pars.append({"context": context.strip(), "qas": qas, "sentences": sents,
                             "sentence_breaks": breaks})
            data.append({"title": f"{lang} title {a}", "paragraphs": pars})
        (root / f"{lang}.json").write_text(json.dumps({"version": "1.1", "data": data}), encoding="utf-8")
    return root

