"""The package's one tokenizer for keyword search.

`terms()` is what BM25 sees (the built-in "lexical" retrieval plugin, whose
index also answers the keyword search of the CLI and admin API):
case-folded words with the accents of Latin letters removed, without common
stop words, lightly stemmed by `stem()`; runs of Chinese, Japanese or Korean
letters (written without spaces) become overlapping pairs of characters; an
identifier joined by `.`, `-`, `_`, `/` or `:` ("v1.2.3", "2023-05-01") is a
term as well as its parts.
"""

from __future__ import annotations

import functools
import re
import unicodedata


def _mark_class() -> str:
    """A regex class of the combining marks (vowel signs of Indic scripts,
    accents written apart): not `\\w` for `re`, yet part of their word."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x300, 0x20000):
        if unicodedata.category(chr(code)).startswith("M"):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    return "".join(f"{chr(a)}-{chr(b)}" if a != b else chr(a) for a, b in ranges)


_MARKS = f"[{_mark_class()}]"
# possessive: a run of letters is never given back, so no text makes these slow
LETTERS = f"(?:[^\\W_]|{_MARKS})++"
WORD = re.compile(f"{LETTERS}(?:['\u2019]{LETTERS})?")
# a run of words joined by . - _ / : with no space ("v1.2.3", "my_var", "a/b"); it
# starts where a run of letters does (a long word without a joiner is one attempt)
COMPOUND = re.compile(f"(?<![^\\W_])(?<!{_MARKS}){LETTERS}(?:[.\\-_/:]{LETTERS})+")
# letters of scripts written without spaces between words: Han, kana, Hangul
CJK = re.compile(
    "[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
    "\uac00-\ud7af\u1100-\u11ff\u3130-\u318f\uff66-\uff9f\U00020000-\U0003134f]+"
)
STOP_WORDS = frozenset(
    [
        "a",
        "an",
        "and",
        "are",
        "as",
        "at",
        "be",
        "but",
        "by",
        "did",
        "do",
        "does",
        "for",
        "from",
        "had",
        "has",
        "have",
        "he",
        "her",
        "him",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "me",
        "my",
        "no",
        "not",
        "of",
        "on",
        "or",
        "our",
        "she",
        "so",
        "than",
        "that",
        "the",
        "their",
        "them",
        "then",
        "there",
        "these",
        "they",
        "this",
        "to",
        "too",
        "us",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "who",
        "why",
        "will",
        "with",
        "you",
        "your",
    ]
)


def words(text: str) -> list[str]:
    """Folded words of a text without common stop words (see `fold`), a
    possessive "'s" removed ("Caroline's" -> "caroline"); single letters are
    left out. CJK runs become character pairs ("東京に" -> "東京", "京に")."""
    out = []
    for raw in WORD.findall(text):
        for part in _split_cjk(fold(raw)):
            word = part.replace("\u2019", "'")
            if word.endswith("'s"):
                word = word[:-2]
            if word not in STOP_WORDS and (len(word) > 1 or word.isdigit() or CJK.match(word)):
                out.append(word)
    for compound in COMPOUND.findall(text):
        out.append(fold(compound))
    return out


@functools.lru_cache(maxsize=1 << 16)
def fold(word: str) -> str:
    """Case-folded ("Straße" -> "strasse"), compatibility forms unified (full
    width, ligatures), and the accents of Latin letters removed ("Café" ->
    "cafe"); the marks of other scripts are part of their letters and stay."""
    word = word.casefold()
    if word.isascii():
        return word
    out: list[str] = []
    latin = False
    for ch in unicodedata.normalize("NFKD", word):
        if unicodedata.combining(ch):
            if latin:
                continue
        else:
            latin = ch < "\u0250" or "\u1e00" <= ch <= "\u1eff"
        out.append(ch)
    return unicodedata.normalize("NFC", "".join(out))


def _split_cjk(word: str) -> list[str]:
    """The word, with each CJK run in it replaced by its overlapping character
    pairs (a one-character run stays as it is)."""
    if word.isascii() or not CJK.search(word):
        return [word]
    out: list[str] = []
    last = 0
    for run in CJK.finditer(word):
        if run.start() > last:
            out.append(word[last : run.start()])
        chars = run.group()
        out += [chars] if len(chars) == 1 else [chars[i : i + 2] for i in range(len(chars) - 1)]
        last = run.end()
    if last < len(word):
        out.append(word[last:])
    return out


def terms(text: str) -> list[str]:
    """The words of a text as BM25 indexes them: `words()`, each `stem()`med."""
    return [stem(w) for w in words(text)]


@functools.lru_cache(maxsize=1 << 16)
def stem(word: str) -> str:
    """A light English suffix stripper, the same for queries and messages.

    In order: a plural -s (-ies -> -y; not after -us, -ss: Harman's S-stemmer),
    then -ing or -ed (-ied -> -y) with a doubled final consonant undone except
    -ll, -ss, -zz, then a final -e. So paints/painted/painting -> paint,
    running -> run, studies/studied/studying -> study, hike/hiked/hiking ->
    hik, boxes/box -> box. Only lower-case ASCII words of four letters or more
    change and a stem keeps at least three; other scripts, numbers and short
    words stay as they are. Irregular forms (ran, children) are not handled.
    """
    if len(word) < 4 or not (word.isascii() and word.isalpha()):
        return word
    if word.endswith("ies") and len(word) > 4 and not word.endswith(("aies", "eies")):
        word = word[:-3] + "y"
    elif word.endswith("s") and not word.endswith(("us", "ss")):
        word = word[:-1]
    if word.endswith("ied") and len(word) > 4:
        word = word[:-3] + "y"
    else:
        for suffix in ("ing", "ed"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[: -len(suffix)]
                if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouylsz":
                    word = word[:-1]
                break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    return word
