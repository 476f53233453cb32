"""The dedup configuration: what to deduplicate and how (phases 1-3 of one run must get equal configs)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .minhash import optimal_bands_rows


@dataclass(kw_only=True)
class DedupConfig:
    """What to deduplicate and how; phases 1-3 of one run must get equal configs."""

    text_field: str = "text"
    """Record field holding the document text (records without a string there are counted skips)."""
    id_field: str = "id"
    """Record field holding the document id written to duplicates; missing -> ``content_id(text)``."""
    url_field: str = "url"
    """Record field holding the document URL; records without a non-empty string there skip URL dedup."""
    url: bool = True
    """URL dedup on the normalised URL (see ``normalize_url``)."""
    exact: bool = True
    """Exact dedup on the xxh3-128 hash of the normalised text (see ``normalize_text``)."""
    fuzzy: bool = True
    """Fuzzy dedup with MinHash LSH over word n-gram shingles of the normalised text."""
    threshold: float = 0.8
    """Jaccard similarity of shingle sets at which documents count as near-duplicates, in (0, 1)."""
    num_perm: int = 128
    """MinHash hash functions per signature."""
    ngram: int = 5
    """Words per shingle."""
    bands: int | None = None
    """LSH bands; None: chosen with ``rows`` by ``optimal_bands_rows`` for ``threshold``."""
    rows: int | None = None
    """Signature values per band; give both ``bands`` and ``rows`` or neither (bands * rows <= num_perm)."""
    false_positive_weight: float = 0.1
    """Weight of the false-positive area of the S-curve when choosing bands and rows. Low by default:
    with ``verify`` a false-positive candidate costs one signature comparison, not precision."""
    false_negative_weight: float = 0.9
    """Weight of the false-negative area of the S-curve when choosing bands and rows. High by default,
    since a missed candidate is a missed duplicate: at threshold 0.8 and 128 permutations, 0.1 / 0.9
    give 14 bands x 9 rows, which make a pair of Jaccard 0.85 a candidate with probability 0.975
    (0.5 / 0.5 give 9 x 13: 0.69), at 0.027 for Jaccard 0.5 (9 x 13: 0.001)."""
    verify: bool = True
    """Link an LSH candidate pair only if its estimated Jaccard is >= threshold (better precision)."""
    seed: int = 1
    """Seed of the MinHash functions: signature files are comparable only under the same seed."""
    batch_docs: int = 1024
    """At most this many documents per numpy hashing batch in phase 1."""
    batch_bytes: int = 1 << 19
    """A phase-1 batch is hashed once its texts reach this many bytes (or ``batch_docs`` documents).
    Larger batches make fewer numpy calls, but their temporaries grow past what the C allocator keeps
    for reuse, and faulting in fresh pages then costs more than the calls saved (measured: 4,600
    documents hashed in 0.11 s CPU with 256 KiB-1 MiB batches, 0.19 s with 2 MiB ones)."""

    def errors(self, names: dict[str, str] | None = None) -> list[str]:
        """Every invalid field, each message starting with its name (``names`` maps field -> flag)."""
        name = (names or {}).get
        errors = []

        def bad(key: str, message: str) -> None:
            errors.append(f"{name(key, key)} {message}")

        if not 0.0 < self.threshold < 1.0:
            bad("threshold", f"must be in (0, 1), got {self.threshold}")
        for key in ("num_perm", "ngram", "batch_docs", "batch_bytes"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if (self.bands is None) != (self.rows is None):
            missing, given = ("bands", "rows") if self.bands is None else ("rows", "bands")
            bad(missing, f"must be given together with {name(given, given)}")
        elif self.bands is not None:
            if self.bands < 1 or self.rows < 1:
                bad("bands", f"and {name('rows', 'rows')} must be >= 1, got {self.bands} and {self.rows}")
            elif self.bands * self.rows > self.num_perm:
                bad("bands", f"x {name('rows', 'rows')} = {self.bands * self.rows} exceeds "
                    f"{name('num_perm', 'num_perm')} = {self.num_perm}")
        for key in ("false_positive_weight", "false_negative_weight"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if not (self.url or self.exact or self.fuzzy):
            errors.append("every dedup kind is disabled (url, exact, fuzzy): nothing to do")
        return errors

    def check(self) -> None:
        """Raise ValueError listing every invalid field."""
        errors = self.errors()
        if errors:
            raise ValueError("; ".join(errors))

    def batch_full(self, docs: int, text_bytes: int) -> bool:
        """Whether a phase-1 batch of ``docs`` texts holding ``text_bytes`` bytes is to be hashed now."""
        return docs >= self.batch_docs or text_bytes >= self.batch_bytes

    def lsh_shape(self) -> tuple[int, int]:
        """(bands, rows): the explicit ones, else those minimising the weighted S-curve error area."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        return optimal_bands_rows(self.threshold, self.num_perm, false_positive_weight=self.false_positive_weight,
                                  false_negative_weight=self.false_negative_weight)


def config_flag_names() -> dict[str, str]:
    """Config field -> CLI flag (``num_perm`` -> ``--num-perm``), for error messages."""
    return {f.name: "--" + f.name.replace("_", "-") for f in fields(DedupConfig)}
