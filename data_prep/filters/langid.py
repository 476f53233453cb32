"""Offline language identification (py3langid's bundled naive Bayes model) and a keep filter.

py3langid is chosen over resiliparse's detector because its normalised output is a probability in [0, 1]
(resiliparse returns an unbounded rank distance), so ``min_score`` reads the same for every language and
every text length. The model ships inside the package: nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

@dataclass(kw_only=True, frozen=True)
class LanguageConfig:
    """Which documents the language stage keeps."""

    keep: tuple[str, ...] = ()
    """ISO 639-1 codes to keep (e.g. ``("en", "de")``); empty keeps every language."""
    min_score: float = 0.0
    """Drop documents whose best language has a lower probability than this (0 keeps all)."""
    max_chars: int = 20_000
    """Only the first this many characters are scored: enough for a stable guess, bounded cost."""

    def validate(self, known: list[str] | None = None) -> list[str]:
        errors = []
        if not 0.0 <= self.min_score <= 1.0:
            errors.append(f"language.min_score: {self.min_score} is not in [0, 1]")
        if self.max_chars < 1:
            errors.append(f"language.max_chars: {self.max_chars} must be at least 1")
        if known is not None:
            unknown = sorted(set(self.keep) - set(known))
            if unknown:
                errors.append(f"language.keep: unknown language code(s) {', '.join(unknown)}")
        return errors


class LanguageIdentifier:
    """Scores texts with the bundled model; one instance per worker (loading takes about a second)."""

    def __init__(self, cfg: LanguageConfig):
        from py3langid.langid import MODEL_FILE
        from py3langid.langid import LanguageIdentifier as _Model

        # norm_probs turns the naive Bayes log scores into a probability distribution over languages.
        self._model = _Model.from_model_file(MODEL_FILE, norm_probs=True)
        errors = cfg.validate(known=self._model.labels)
        if errors:
            raise ValueError("; ".join(errors))
        self.cfg = cfg
        self._keep = frozenset(cfg.keep)

    @property
    def languages(self) -> list[str]:
        return list(self._model.labels)

    def identify(self, text: str) -> tuple[str, float]:
        """(language code, probability in [0, 1]) of the text's most likely language."""
        language, score = self._model.classify(text[: self.cfg.max_chars])
        return language, round(float(score), 4)

    def filter(self, doc) -> str | None:
        """Record ``language`` and ``language_score`` in ``doc.meta``; return None to keep the document,
        else ``language_not_kept`` or ``language_score_too_low``."""
        language, score = self.identify(doc.text)
        doc.meta["language"] = language
        doc.meta["language_score"] = score
        if self._keep and language not in self._keep:
            return "language_not_kept"
        if score < self.cfg.min_score:
            return "language_score_too_low"
        return None
