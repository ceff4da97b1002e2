"""ISO 639-1 language codes: the only check on a row's `lang` (a typo would silently create a
new "language" and skew monolingual batches and per-language metrics)."""

from __future__ import annotations

import re

from raysys.errors import DataError

# All ISO 639-1 two-letter codes (183 current ones plus the deprecated but still seen bh, sh).
ISO_639_1: frozenset[str] = frozenset("""
aa ab ae af ak am an ar as av ay az
ba be bg bh bi bm bn bo br bs
ca ce ch co cr cs cu cv cy
da de dv dz
ee el en eo es et eu
fa ff fi fj fo fr fy
ga gd gl gn gu gv
ha he hi ho hr ht hu hy hz
ia id ie ig ii ik io is it iu
ja jv
ka kg ki kj kk kl km kn ko kr ks ku kv kw ky
la lb lg li ln lo lt lu lv
mg mh mi mk ml mn mr ms mt my
na nb nd ne ng nl nn no nr nv ny
oc oj om or os
pa pi pl ps pt
qu
rm rn ro ru rw
sa sc sd se sg sh si sk sl sm sn so sq sr ss st su sv sw
ta te tg th ti tk tl tn to tr ts tt tw ty
ug uk ur uz
ve vi vo
wa wo
xh
yi yo
za zh zu
""".split())

# Primary subtag plus optional BCP-47-style subtags: zh-cn, pt_BR, zh-Hans, sr-Latn-RS.
_TAG = re.compile(r"^([A-Za-z]{2})((?:[-_][A-Za-z0-9]{2,8})*)$")


def normalize_language(code: str) -> str | None:
    """The canonical form (lower case, '-' separators) of a valid code, else None."""
    if not isinstance(code, str):
        return None
    match = _TAG.match(code.strip())
    if match is None or match.group(1).lower() not in ISO_639_1:
        return None
    return (match.group(1) + match.group(2)).lower().replace("_", "-")


def is_language(code: str) -> bool:
    return normalize_language(code) is not None


def check_language(code: str, *, file: str | None = None, row: int | None = None,
                   field: str = "lang") -> str:
    """Return the canonical code, or raise DataError locating the unknown one."""
    normalized = normalize_language(code)
    if normalized is None:
        raise DataError(f"unknown language code {code!r}", file=file, row=row, field=field,
                        hint="use an ISO 639-1 two-letter code such as 'en', 'de', 'zh', "
                             "optionally with a region/script subtag like 'pt-br' or 'zh-hans'")
    return normalized


def wanted_languages(codes: list[str] | None) -> list[str] | None:
    """`data.languages` as the normalised codes that rows hold (None: every language)."""
    return sorted({normalize_language(code) for code in codes}) if codes else None
