"""Heuristic quality filters: the Gopher rules (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", section A.1.1 "MassiveWeb" quality and repetition filters)
and the C4 rules (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", section 2.2 "Colossal Clean Crawled Corpus").

Both filters are callables ``f(doc) -> reason | None``: ``None`` keeps the document, a string names the
rule that removed it. Line-level rules (C4) edit ``doc.text`` in place. Each filter keeps a ``counts``
Counter on the instance: ``documents`` seen, ``kept``, one entry per removal reason, and
``lines_removed:<rule>`` per line rule; worker processes return theirs and ``merge`` adds them up.

Every threshold lives in a typed config whose defaults are the papers' values; setting a threshold to
``None`` (or removing an n-gram size from a mapping) switches that rule off.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_BAD_WORDS_PATH = str(Path(__file__).resolve().parents[2] / "configs" / "data" / "bad_words_en.txt")


# --------------------------------------------------------------------------------------------- Gopher
@dataclass(kw_only=True)
class GopherConfig:
    """Thresholds of the Gopher quality and repetition rules (Rae et al. 2021, A.1.1, Table A1)."""

    min_words: int | None = 50
    """Drop documents with fewer whitespace-separated words (Gopher: 50)."""
    max_words: int | None = 100_000
    """Drop documents with more words (Gopher: 100,000)."""
    min_mean_word_length: float | None = 3.0
    """Drop documents whose mean word length (words stripped of surrounding punctuation) is below
    this (Gopher: 3 characters)."""
    max_mean_word_length: float | None = 10.0
    """... or above this (Gopher: 10 characters)."""
    max_hash_ratio: float | None = 0.1
    """Drop documents with more than this many ``#`` symbols per word (Gopher: 0.1)."""
    max_ellipsis_ratio: float | None = 0.1
    """Drop documents with more than this many ellipses (``...`` or ``…``) per word (Gopher: 0.1)."""
    max_bullet_lines_fraction: float | None = 0.9
    """Drop documents where more than this fraction of the non-blank lines start with a bullet
    (Gopher: 90 %)."""
    bullets: tuple[str, ...] = ("•", "●", "○", "◦", "▪", "▫", "■", "□", "‣", "⁃", "-", "*", "–", "—")
    """What counts as a bullet at the start of a line (after leading whitespace)."""
    max_ellipsis_lines_fraction: float | None = 0.3
    """Drop documents where more than this fraction of the non-blank lines end with an ellipsis
    (Gopher: 30 %)."""
    min_stop_words: int | None = 2
    """Drop documents containing fewer than this many *different* words of ``stop_words`` (Gopher: "at
    least two of the following English words")."""
    stop_words: frozenset[str] = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
    """The Gopher stop words, matched lowercased after stripping surrounding punctuation."""
    min_alpha_words_fraction: float | None = 0.8
    """Drop documents where fewer than this fraction of the words contain an alphabetic character
    (Gopher: 80 %)."""
    max_duplicate_lines_fraction: float | None = 0.30
    """Drop documents where more than this fraction of the non-blank lines repeat an earlier line
    (Gopher Table A1: 0.30)."""
    max_duplicate_paragraphs_fraction: float | None = 0.30
    """The same over paragraphs (blocks separated by blank lines) (Gopher Table A1: 0.30)."""
    max_duplicate_line_chars_fraction: float | None = 0.20
    """Drop documents where more than this fraction of the line characters are in lines repeating an
    earlier line (Gopher Table A1: 0.20)."""
    max_duplicate_paragraph_chars_fraction: float | None = 0.20
    """The same over paragraphs (Gopher Table A1: 0.20)."""
    max_top_ngram_chars_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    """n -> the largest fraction of the word characters that the most frequent n-gram may cover
    (Gopher Table A1: 2-grams 0.20, 3-grams 0.18, 4-grams 0.16). Remove a key to switch that n off."""
    max_duplicate_ngram_chars_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})
    """n -> the largest fraction of the word characters that may be covered by n-grams occurring more
    than once (Gopher Table A1: 5-grams 0.15 down to 10-grams 0.10)."""

    def __post_init__(self) -> None:
        # Mappings from JSON or command-line overrides arrive with string keys ("5": 0.15).
        for name in ("max_top_ngram_chars_fraction", "max_duplicate_ngram_chars_fraction"):
            normalized = {}
            for n, limit in getattr(self, name).items():
                try:
                    normalized[int(n)] = float(limit)
                except (TypeError, ValueError):
                    raise ValueError(f"{name}: expected n-gram size -> fraction, got {n!r}: {limit!r}") from None
                if int(n) < 1:
                    raise ValueError(f"{name}: n-gram sizes must be >= 1, got {n!r}")
            setattr(self, name, normalized)


# Characters stripped from the ends of a word before measuring it: ASCII punctuation plus the usual
# typographic quotes, dashes and the ellipsis character.
_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»–—…¡¿"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def _strip_punct(word: str) -> str:
    return word.strip(_PUNCTUATION)


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, their characters): the first occurrence is the
    original, every later one a duplicate."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _ngram_ids(word_ids: np.ndarray, n: int) -> np.ndarray:
    """One integer per n-gram position, equal iff the n-grams are equal (np.unique over the windows)."""
    windows = np.lib.stride_tricks.sliding_window_view(word_ids, n)
    _, inverse = np.unique(windows, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def _covered_chars(starts: np.ndarray, n: int, lengths: np.ndarray) -> int:
    """Characters of the words covered by n-grams starting at ``starts``; overlapping n-grams count
    each word once, so the fraction never exceeds 1."""
    covered = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.add.at(covered, starts, 1)
    np.add.at(covered, starts + n, -1)
    return int(lengths[np.cumsum(covered[:-1]) > 0].sum())


class GopherQualityFilter:
    """The Gopher rules. Words are whitespace-separated tokens; their characters (the denominator of
    the n-gram fractions) are the tokens' lengths."""

    def __init__(self, cfg: GopherConfig | None = None) -> None:
        self.cfg = cfg or GopherConfig()
        self.counts: Counter = Counter()

    def merge(self, other_counts: Counter) -> None:
        self.counts.update(other_counts)

    def __call__(self, doc) -> str | None:
        self.counts["documents"] += 1
        reason = self.check(doc.text)
        self.counts[reason or "kept"] += 1
        return reason

    def check(self, text: str) -> str | None:
        """The first rule ``text`` breaks (cheap rules first), else None."""
        c = self.cfg
        words = text.split()
        if c.min_words is not None and len(words) < c.min_words:
            return "gopher_min_words"
        if c.max_words is not None and len(words) > c.max_words:
            return "gopher_max_words"
        n_words = max(len(words), 1)
        stripped = [_strip_punct(w) for w in words]
        lengths = [len(w) for w in stripped if w]
        mean_length = sum(lengths) / len(lengths) if lengths else 0.0
        if c.min_mean_word_length is not None and mean_length < c.min_mean_word_length:
            return "gopher_mean_word_length_low"
        if c.max_mean_word_length is not None and mean_length > c.max_mean_word_length:
            return "gopher_mean_word_length_high"
        if c.max_hash_ratio is not None and text.count("#") / n_words > c.max_hash_ratio:
            return "gopher_hash_ratio"
        if c.max_ellipsis_ratio is not None and \
                (text.count("...") + text.count("…")) / n_words > c.max_ellipsis_ratio:
            return "gopher_ellipsis_ratio"
        lines = [line.strip() for line in text.split("\n")]
        lines = [line for line in lines if line]
        n_lines = max(len(lines), 1)
        if c.max_bullet_lines_fraction is not None and \
                sum(line.startswith(c.bullets) for line in lines) / n_lines > c.max_bullet_lines_fraction:
            return "gopher_bullet_lines"
        if c.max_ellipsis_lines_fraction is not None and \
                sum(line.endswith(("...", "…")) for line in lines) / n_lines > c.max_ellipsis_lines_fraction:
            return "gopher_ellipsis_lines"
        if c.min_stop_words is not None and \
                len(c.stop_words.intersection(w.lower() for w in stripped)) < c.min_stop_words:
            return "gopher_stop_words"
        if c.min_alpha_words_fraction is not None and \
                sum(any(ch.isalpha() for ch in w) for w in words) / n_words < c.min_alpha_words_fraction:
            return "gopher_alpha_words"
        return self._repetition(text, lines, words)

    def _repetition(self, text: str, lines: list[str], words: list[str]) -> str | None:
        c = self.cfg
        line_dups, line_dup_chars = _duplicates(lines)
        if c.max_duplicate_lines_fraction is not None and \
                line_dups / max(len(lines), 1) > c.max_duplicate_lines_fraction:
            return "gopher_duplicate_lines"
        paragraphs = [p.strip() for p in _PARAGRAPH_BREAK.split(text)]
        paragraphs = [p for p in paragraphs if p]
        para_dups, para_dup_chars = _duplicates(paragraphs)
        if c.max_duplicate_paragraphs_fraction is not None and \
                para_dups / max(len(paragraphs), 1) > c.max_duplicate_paragraphs_fraction:
            return "gopher_duplicate_paragraphs"
        if c.max_duplicate_line_chars_fraction is not None and \
                line_dup_chars / max(sum(map(len, lines)), 1) > c.max_duplicate_line_chars_fraction:
            return "gopher_duplicate_line_chars"
        if c.max_duplicate_paragraph_chars_fraction is not None and \
                para_dup_chars / max(sum(map(len, paragraphs)), 1) > c.max_duplicate_paragraph_chars_fraction:
            return "gopher_duplicate_paragraph_chars"
        if not (c.max_top_ngram_chars_fraction or c.max_duplicate_ngram_chars_fraction):
            return None
        vocabulary: dict[str, int] = {}
        word_ids = np.fromiter((vocabulary.setdefault(w, len(vocabulary)) for w in words), dtype=np.int64,
                               count=len(words))
        lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
        total_chars = max(int(lengths.sum()), 1)
        for n, limit in sorted(c.max_top_ngram_chars_fraction.items()):
            if len(words) < n:
                continue
            ids = _ngram_ids(word_ids, n)
            frequency = np.bincount(ids)
            if frequency.max() < 2:  # no n-gram repeats: nothing is "top"
                continue
            # The most frequent n-gram; among equally frequent ones, the one with the most characters.
            window_chars = np.convolve(lengths, np.ones(n, dtype=np.int64), mode="valid")
            candidates = np.flatnonzero(frequency[ids] == frequency.max())
            top = ids[candidates[np.argmax(window_chars[candidates])]]
            if _covered_chars(np.flatnonzero(ids == top), n, lengths) / total_chars > limit:
                return f"gopher_top_{n}gram"
        for n, limit in sorted(c.max_duplicate_ngram_chars_fraction.items()):
            if len(words) < n:
                continue
            ids = _ngram_ids(word_ids, n)
            repeated = np.flatnonzero(np.bincount(ids)[ids] > 1)
            # Every occurrence of a repeated n-gram counts, the first included (Gopher: "characters
            # contained within all duplicate n-grams").
            if _covered_chars(repeated, n, lengths) / total_chars > limit:
                return f"gopher_duplicate_{n}gram"
        return None


# ------------------------------------------------------------------------------------------------- C4
@dataclass(kw_only=True)
class C4Config:
    """The C4 cleaning rules (Raffel et al. 2020, section 2.2)."""

    terminal_punctuation: tuple[str, ...] | None = (".", "!", "?", '"', "”")
    """Keep only lines ending with one of these (C4: "a terminal punctuation mark (i.e. a period,
    exclamation mark, question mark, or end quotation mark)"). None keeps lines whatever their end."""
    min_words_per_line: int | None = 5
    """Remove lines with fewer whitespace-separated words (C4: "at least 5 words")."""
    remove_javascript_lines: bool = True
    """Remove lines containing the word "javascript", any case (C4: JavaScript warnings)."""
    drop_lorem_ipsum: bool = True
    """Drop documents containing "lorem ipsum", any case (C4: placeholder text)."""
    drop_curly_brace: bool = True
    """Drop documents containing ``{`` (C4: "to remove code")."""
    min_sentences: int | None = 3
    """Drop documents whose kept lines hold fewer sentences (C4: 3). A sentence ends with ``.``, ``!``
    or ``?`` (optionally followed by a closing quote) before whitespace or the end of the text."""
    bad_words_path: str | None = DEFAULT_BAD_WORDS_PATH
    """A file of bad words or phrases, one per line, ``#`` starts a comment line; documents containing
    any of them as whole words (any case) are dropped (C4 used the "List of Dirty, Naughty, Obscene or
    Otherwise Bad Words"; the default is its English file). None switches the rule off."""


def load_bad_words(path: str) -> list[str]:
    """The words/phrases of a bad-words file (blank lines and ``#`` comment lines skipped, lowercased)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as err:
        raise ValueError(f"bad_words_path: cannot read {path!r} ({err.strerror or err})") from err
    words = [line.strip().lower() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not words:
        raise ValueError(f"bad_words_path: {path!r} lists no words")
    return words


class BadWords:
    """Matches any of ``words`` as whole words, any case: not inside a longer word, so "ass" does not
    match "class". Plain words are looked up in a set of the text's words (fast on long documents);
    only phrases and entries with other characters ("s&m", "g-spot") go through one regex."""

    _WORD = re.compile(r"\w+")

    def __init__(self, words: list[str]) -> None:
        words = {w.lower() for w in words}
        self.plain = frozenset(w for w in words if self._WORD.fullmatch(w))
        others = sorted(words - self.plain, key=len, reverse=True)  # longest first: a phrase wins
        self.pattern = re.compile(rf"(?<!\w)(?:{'|'.join(map(re.escape, others))})(?!\w)") if others else None

    def search(self, text: str) -> str | None:
        """The first bad word or phrase found in ``text``, else None."""
        lowered = text.lower()
        for word in self._WORD.findall(lowered):
            if word in self.plain:
                return word
        match = self.pattern.search(lowered) if self.pattern is not None else None
        return match.group(0) if match else None


_SENTENCE_END = re.compile(r"[.!?]+[\"”’')\]]*(?=\s|$)")


class C4QualityFilter:
    """The C4 rules. Document rules (lorem ipsum, curly brace, bad words) look at the whole input text,
    as the paper states them per page; the line rules then edit ``doc.text``, and the sentence count is
    taken on the lines kept. A line that breaks several line rules is counted under the first of
    javascript, terminal punctuation, minimum words. Blank lines are dropped without being counted."""

    def __init__(self, cfg: C4Config | None = None) -> None:
        self.cfg = cfg or C4Config()
        self.counts: Counter = Counter()
        self._bad_words = BadWords(load_bad_words(self.cfg.bad_words_path)) \
            if self.cfg.bad_words_path is not None else None

    def merge(self, other_counts: Counter) -> None:
        self.counts.update(other_counts)

    def __call__(self, doc) -> str | None:
        self.counts["documents"] += 1
        reason = self._check(doc)
        self.counts[reason or "kept"] += 1
        return reason

    def _check(self, doc) -> str | None:
        c = self.cfg
        lowered = doc.text.lower()
        if c.drop_lorem_ipsum and "lorem ipsum" in lowered:
            return "c4_lorem_ipsum"
        if c.drop_curly_brace and "{" in doc.text:
            return "c4_curly_brace"
        if self._bad_words is not None and self._bad_words.search(doc.text):
            return "c4_bad_words"
        kept = []
        for raw in doc.text.split("\n"):
            line = raw.strip()
            if not line:
                continue
            rule = self._line_rule(line)
            if rule is None:
                kept.append(line)
            else:
                self.counts[f"lines_removed:{rule}"] += 1
        doc.text = "\n".join(kept)
        if c.min_sentences is not None and len(_SENTENCE_END.findall(doc.text)) < c.min_sentences:
            return "c4_min_sentences"
        if not kept:
            return "c4_no_lines_left"
        return None

    def _line_rule(self, line: str) -> str | None:
        c = self.cfg
        if c.remove_javascript_lines and "javascript" in line.lower():
            return "c4_javascript"
        if c.terminal_punctuation is not None and not line.endswith(c.terminal_punctuation):
            return "c4_terminal_punctuation"
        if c.min_words_per_line is not None and len(line.split()) < c.min_words_per_line:
            return "c4_min_words_per_line"
        return None
