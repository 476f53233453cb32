"""Gopher and C4 heuristic rules: each rule alone, on a document just inside and just outside its
threshold, with the counts it keeps; the default bad-words file; defaults on ordinary prose."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from gptforge.data_prep.filters.quality import (DEFAULT_BAD_WORDS_PATH, BadWords, C4Config, C4QualityFilter,
                                                GopherConfig, GopherQualityFilter, load_bad_words)
from gptforge.data_prep.readers.web_document import WebDocument

pytestmark = pytest.mark.unit

# Filler words use the letters n..z; words that must repeat use a..j, so the two never collide.
FILLER_LETTERS = "nopqrstuvwxyz"


def word(index: int, length: int, letters: str = FILLER_LETTERS) -> str:
    """The index-th word of ``length`` letters (distinct indices give distinct words)."""
    out = []
    for _ in range(length):
        index, digit = divmod(index, len(letters))
        out.append(letters[digit])
    assert index == 0, "index too large for this length"
    return "".join(out)


def words(count: int, length: int = 6, start: int = 0) -> list[str]:
    return [word(start + i, length) for i in range(count)]


def filler(chars: int, start: int) -> list[str]:
    """Distinct words of 5 or 6 letters whose lengths add up to exactly ``chars`` (>= 20)."""
    sixes = next(b for b in range(5) if (chars - 6 * b) % 5 == 0)
    return [word(start + i, 6) for i in range(sixes)] + [word(start + i, 5) for i in range((chars - 6 * sixes) // 5)]


def rule_only(cls, **settings):
    """A config with every rule switched off except ``settings``."""
    off = {}
    for f in dataclasses.fields(cls):
        if f.name in ("bullets", "stop_words"):  # parameters of a rule, not rules
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        off[f.name] = False if isinstance(default, bool) else {} if isinstance(default, dict) else None
    return cls(**(off | settings))


def gopher_cases():
    cases = []

    def case(name, cfg, keep_text, drop_text, reason):
        cases.append(pytest.param(cfg, keep_text, drop_text, reason, id=name))

    case("min_words", dict(min_words=50), " ".join(words(50)), " ".join(words(49)), "gopher_min_words")
    case("max_words", dict(max_words=100_000), " ".join(words(100_000, 5)), " ".join(words(100_001, 5)),
         "gopher_max_words")
    # Surrounding punctuation does not count: "xyz." is 3 letters.
    three = words(60, 3)
    case("mean_word_length_low", dict(min_mean_word_length=3.0), " ".join(three) + ".",
         " ".join(three[:-1] + [three[-1][:2]]) + ".", "gopher_mean_word_length_low")
    ten = words(60, 10)
    case("mean_word_length_high", dict(max_mean_word_length=10.0), " ".join(ten) + "!",
         " ".join(ten[:-1] + [ten[-1] + "n"]), "gopher_mean_word_length_high")

    def marked(n_marked, mark, prefix=False):
        return " ".join((mark + w if prefix else w + mark) if i < n_marked else w for i, w in enumerate(words(100)))

    case("hash_ratio", dict(max_hash_ratio=0.1), marked(10, "#", True), marked(11, "#", True), "gopher_hash_ratio")
    case("ellipsis_ratio_dots", dict(max_ellipsis_ratio=0.1), marked(10, "..."), marked(11, "..."),
         "gopher_ellipsis_ratio")
    case("ellipsis_ratio_char", dict(max_ellipsis_ratio=0.1), marked(10, "…"), marked(11, "…"),
         "gopher_ellipsis_ratio")

    def lines(n_marked, total, make):
        return "\n".join(make(" ".join(words(5, start=5 * i))) if i < n_marked else " ".join(words(5, start=5 * i))
                         for i in range(total))

    case("bullet_lines", dict(max_bullet_lines_fraction=0.9), lines(18, 20, lambda s: "• " + s),
         lines(19, 20, lambda s: "  - " + s), "gopher_bullet_lines")
    case("ellipsis_lines", dict(max_ellipsis_lines_fraction=0.3), lines(3, 10, lambda s: s + "..."),
         lines(4, 10, lambda s: s + " …"), "gopher_ellipsis_lines")
    # "At least two of" the stop words: two different ones, not one twice.
    body = words(60)
    case("stop_words", dict(min_stop_words=2), " ".join(["The"] + body + ["and."]),
         " ".join(["The"] + body + ["the."]), "gopher_stop_words")
    numbers = [str(10_000 + i) for i in range(21)]
    case("alpha_words", dict(min_alpha_words_fraction=0.8), " ".join(words(80) + numbers[:20]),
         " ".join(words(79) + numbers), "gopher_alpha_words")

    def repeated(total, duplicates, sep):
        unique = [" ".join(words(4, start=4 * i)) for i in range(total - duplicates)]
        return sep.join(unique + [unique[0]] * duplicates)

    case("duplicate_lines", dict(max_duplicate_lines_fraction=0.30), repeated(20, 6, "\n"), repeated(20, 7, "\n"),
         "gopher_duplicate_lines")
    case("duplicate_paragraphs", dict(max_duplicate_paragraphs_fraction=0.30), repeated(20, 6, "\n\n"),
         repeated(20, 7, "\n  \n"), "gopher_duplicate_paragraphs")

    def repeated_chars(dup_len, sep):
        # Lines of 20 + 30 + 30 characters plus a copy of the first: dup_len / (60 + 2 * dup_len).
        first = word(0, dup_len)
        return sep.join([first, word(1, 30), word(2, 30), first])

    case("duplicate_line_chars", dict(max_duplicate_line_chars_fraction=0.20), repeated_chars(20, "\n"),
         repeated_chars(21, "\n"), "gopher_duplicate_line_chars")
    case("duplicate_paragraph_chars", dict(max_duplicate_paragraph_chars_fraction=0.20),
         repeated_chars(20, "\n\n"), repeated_chars(21, "\n\n"), "gopher_duplicate_paragraph_chars")

    def ngram_text(gram, repeats, total_chars):
        """``gram`` ``repeats`` times, separated by distinct filler, ``total_chars`` word characters in all."""
        rest = total_chars - repeats * sum(map(len, gram))
        fill = filler(rest, 0)
        step = len(fill) // repeats
        out = []
        for r in range(repeats):
            out += gram + fill[r * step:(r + 1) * step if r < repeats - 1 else None]
        return " ".join(out)

    # Top n-gram: the most frequent n-gram's occurrences cover repeats * chars(gram) characters.
    for n, limit, repeats, gram_len, total in ((2, 0.20, 2, 5, 100), (3, 0.18, 6, 5, 500), (4, 0.16, 4, 5, 500)):
        gram = [word(i, gram_len, "abcdefghij") for i in range(n)]
        assert repeats * n * gram_len / total == limit
        case(f"top_{n}gram", dict(max_top_ngram_chars_fraction={n: limit}), ngram_text(gram, repeats, total),
             ngram_text(gram, repeats, total - 1), f"gopher_top_{n}gram")
    # Duplicate n-grams: an n-gram of 20 - n characters twice covers 2 * (20 - n) of 200 characters,
    # exactly the Gopher limit (20 - n) / 100 for n = 5..10.
    for n in range(5, 11):
        extra = 20 - 2 * n
        gram = ["abcdefghij"[i] * (1 + extra // n + (i < extra % n)) for i in range(n)]
        limit = GopherConfig().max_duplicate_ngram_chars_fraction[n]
        assert 2 * sum(map(len, gram)) / 200 == limit
        case(f"duplicate_{n}gram", dict(max_duplicate_ngram_chars_fraction={n: limit}), ngram_text(gram, 2, 200),
             ngram_text(gram, 2, 199), f"gopher_duplicate_{n}gram")
    return cases


@pytest.mark.parametrize("settings, keep_text, drop_text, reason", gopher_cases())
def test_gopher_rule_at_its_threshold(settings, keep_text, drop_text, reason):
    gopher = GopherQualityFilter(rule_only(GopherConfig, **settings))
    assert gopher(WebDocument(id="keep", text=keep_text)) is None
    assert gopher(WebDocument(id="drop", text=drop_text)) == reason
    assert gopher.counts == Counter({"documents": 2, "kept": 1, reason: 1})
    # The rule switched off keeps both.
    assert GopherQualityFilter(rule_only(GopherConfig)).check(drop_text) is None


PROSE = (
    "The committee met on Tuesday to discuss the budget for the coming year. Members agreed that the "
    "library should have longer opening hours, and that the reading room needs new chairs.\n"
    "After a short debate, they voted to fund both projects with the money left over from last spring. "
    "The treasurer will report on the costs at the next meeting, which is planned for early March.\n"
    "Anyone who wants to comment on the plan can write to the secretary before the end of the month."
)


def test_defaults_keep_ordinary_prose_and_drop_junk():
    gopher, c4 = GopherQualityFilter(), C4QualityFilter()
    doc = WebDocument(id="prose", text=PROSE)
    assert gopher(doc) is None and c4(doc) is None
    assert doc.text == PROSE  # every line ends a sentence and has >= 5 words: nothing removed
    spam = "\n".join(["Buy cheap watches online today and save the best price with us."] * 10)
    assert gopher(WebDocument(id="spam", text=spam)) == "gopher_duplicate_lines"
    assert gopher.counts == Counter({"documents": 2, "kept": 1, "gopher_duplicate_lines": 1})


def test_merge_adds_worker_counts():
    main, worker = GopherQualityFilter(), GopherQualityFilter()
    main(WebDocument(id="a", text="too short"))
    worker(WebDocument(id="b", text="also short"))
    worker(WebDocument(id="c", text=PROSE))
    main.merge(worker.counts)
    assert main.counts == Counter({"documents": 3, "gopher_min_words": 2, "kept": 1})


# ------------------------------------------------------------------------------------------------ C4
def sentence(i: int, n_words: int = 6, end: str = ".") -> str:
    return " ".join(words(n_words, start=10 * i)) + end


@pytest.mark.parametrize("settings, line, kept, rule", [
    pytest.param(dict(terminal_punctuation=C4Config().terminal_punctuation), sentence(1, end="."), True,
                 "c4_terminal_punctuation", id="terminal_period"),
    pytest.param(dict(terminal_punctuation=C4Config().terminal_punctuation), sentence(1, end='?"'), True,
                 "c4_terminal_punctuation", id="terminal_quote"),
    pytest.param(dict(terminal_punctuation=C4Config().terminal_punctuation), sentence(1, end=":"), False,
                 "c4_terminal_punctuation", id="terminal_colon"),
    pytest.param(dict(min_words_per_line=5), sentence(1, n_words=5), True, "c4_min_words_per_line", id="words_5"),
    pytest.param(dict(min_words_per_line=5), sentence(1, n_words=4), False, "c4_min_words_per_line", id="words_4"),
    pytest.param(dict(remove_javascript_lines=True), "Please enable JavaScript to view this page.", False,
                 "c4_javascript", id="javascript"),
    pytest.param(dict(remove_javascript_lines=True), "Please enable Java scripts to view this page.", True,
                 "c4_javascript", id="java_script"),
])
def test_c4_line_rule(settings, line, kept, rule):
    c4 = C4QualityFilter(rule_only(C4Config, **settings))
    doc = WebDocument(id="d", text=f"{sentence(0)}\n\n{line}\n{sentence(2)}")
    assert c4(doc) is None
    expected = [sentence(0)] + ([line] if kept else []) + [sentence(2)]
    assert doc.text == "\n".join(expected)
    assert c4.counts == Counter({"documents": 1, "kept": 1} | ({} if kept else {f"lines_removed:{rule}": 1}))


def test_c4_line_counted_under_its_first_rule_and_empty_result_dropped():
    c4 = C4QualityFilter(rule_only(C4Config, remove_javascript_lines=True, min_words_per_line=5,
                                   terminal_punctuation=(".",)))
    doc = WebDocument(id="d", text="javascript menu\nshort line here\nno terminal mark on this line")
    assert c4(doc) == "c4_no_lines_left"
    assert doc.text == ""
    assert c4.counts == Counter({"documents": 1, "c4_no_lines_left": 1, "lines_removed:c4_javascript": 1,
                                 "lines_removed:c4_terminal_punctuation": 2})


@pytest.mark.parametrize("settings, keep_text, drop_text, reason", [
    pytest.param(dict(drop_lorem_ipsum=True), f"{sentence(0)} Lorem, ipsum.", f"{sentence(0)} LOREM Ipsum dolor.",
                 "c4_lorem_ipsum", id="lorem_ipsum"),
    pytest.param(dict(drop_curly_brace=True), f"{sentence(0)} (see below) [1].", f"{sentence(0)} function() {{ }}.",
                 "c4_curly_brace", id="curly_brace"),
    pytest.param(dict(min_sentences=3), f"{sentence(0)} {sentence(1, end='!')}\n{sentence(2, end='?')}",
                 f"{sentence(0)} {sentence(1, end='!')}\n{sentence(2, end=',')}", "c4_min_sentences",
                 id="min_sentences"),
])
def test_c4_document_rule(settings, keep_text, drop_text, reason):
    c4 = C4QualityFilter(rule_only(C4Config, **settings))
    assert c4(WebDocument(id="k", text=keep_text)) is None
    assert c4(WebDocument(id="d", text=drop_text)) == reason
    assert c4.counts == Counter({"documents": 2, "kept": 1, reason: 1})


def test_c4_sentences_counted_on_kept_lines_only():
    c4 = C4QualityFilter(rule_only(C4Config, min_sentences=3, min_words_per_line=5))
    # Three sentences, but the third sits on a 3-word line that the line rule removes.
    doc = WebDocument(id="d", text=f"{sentence(0)}\n{sentence(1)}\nToo short here.")
    assert c4(doc) == "c4_min_sentences"
    assert c4.counts["lines_removed:c4_min_words_per_line"] == 1


def test_default_bad_words_file():
    listed = load_bad_words(DEFAULT_BAD_WORDS_PATH)
    assert len(listed) > 300 and all(not w.startswith("#") for w in listed)
    plain = next(w for w in listed if w.isalpha() and len(w) > 4)
    phrase = next(w for w in listed if " " in w and not set(w.split()) & set(listed))
    c4 = C4QualityFilter(rule_only(C4Config, bad_words_path=DEFAULT_BAD_WORDS_PATH))
    base = " ".join(words(8)) + " "
    assert c4(WebDocument(id="inside", text=base + f"x{plain}y.")) is None  # part of a longer word
    assert c4(WebDocument(id="split", text=base + phrase.replace(" ", " and ") + ".")) is None
    assert c4(WebDocument(id="word", text=base + plain.upper() + ".")) == "c4_bad_words"
    assert c4(WebDocument(id="phrase", text=base + phrase.title() + "!")) == "c4_bad_words"
    assert c4.counts == Counter({"documents": 4, "kept": 2, "c4_bad_words": 2})


def test_bad_words_file_of_your_own(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# my list\n\nfoo bar\nC++\nqux\n")
    assert load_bad_words(str(path)) == ["foo bar", "c++", "qux"]
    bad = BadWords(load_bad_words(str(path)))
    assert bad.search("We like Foo  bar.") is None  # the phrase is matched with single spaces
    assert bad.search("We like FOO BAR.") == "foo bar"
    assert bad.search("Written in c++ mostly") == "c++"
    assert bad.search("quxes and bar foo") is None
    with pytest.raises(ValueError, match="bad_words_path.*missing.txt"):
        C4QualityFilter(C4Config(bad_words_path=str(tmp_path / "missing.txt")))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="bad_words_path.*lists no words"):
        load_bad_words(str(tmp_path / "empty.txt"))


def test_ngram_limits_from_text_keys_and_bad_values():
    cfg = GopherConfig(max_top_ngram_chars_fraction={"2": 0.5}, max_duplicate_ngram_chars_fraction={})
    assert cfg.max_top_ngram_chars_fraction == {2: 0.5}
    with pytest.raises(ValueError, match="max_duplicate_ngram_chars_fraction: expected n-gram size"):
        GopherConfig(max_duplicate_ngram_chars_fraction={"five": 0.1})
    with pytest.raises(ValueError, match="max_top_ngram_chars_fraction: n-gram sizes must be >= 1"):
        GopherConfig(max_top_ngram_chars_fraction={0: 0.1})
