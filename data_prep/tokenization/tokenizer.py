"""SentencePiece BPE with byte fallback: GPT-2-like byte-level coverage, so no UTF-8 input is ever unknown.

``Tokenizer(path)`` also runs GPT-2's byte-level BPE (``byte_bpe.py``, a ``tokenizer.json`` file): the
kind is read from the file's content, so the rest of gptforge takes either one by path.

Training keeps text as it is (identity normalisation, no dummy prefix, whitespace kept), so
``decode(encode(text)) == text`` for any string. ``<|endoftext|>`` is a control token: it separates
documents in the token stream and is never produced from text.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass

import sentencepiece as spm

from ...common.errors import UserError
from .byte_bpe import ByteBPE, is_tokenizers_json
from ..readers.documents import SkipLog, check_input_files, iter_texts

SENTENCEPIECE = "sentencepiece"
BYTE_BPE = "byte-bpe"
TOKENIZER_KINDS = (SENTENCEPIECE, BYTE_BPE)
EOD_TOKEN = "<|endoftext|>"
# SentencePiece stores spaces as U+2581; a literal U+2581 in the text would decode as a space, so
# the encoder emits that character through its three UTF-8 byte tokens instead.
_SPACE_MARK = "\u2581"


def tokenizer_kind(path: str) -> str:
    """``byte-bpe`` for a tokenizers JSON file, ``sentencepiece`` otherwise (a binary model)."""
    return BYTE_BPE if is_tokenizers_json(path) else SENTENCEPIECE


class Tokenizer:
    """A trained tokenizer with our conventions (no unknown input, EOD separator never produced from
    text): SentencePiece BPE with byte fallback, or GPT-2's byte-level BPE (``kind``)."""

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise UserError(f"tokenizer model {model_path!r} does not exist; train one with "
                                    f"'gptforge tokenizer train'")
        self.path = model_path
        with open(model_path, "rb") as handle:
            self.sha256 = hashlib.sha256(handle.read()).hexdigest()
        self.kind = tokenizer_kind(model_path)
        self._bpe: ByteBPE | None = None
        if self.kind == BYTE_BPE:
            self._bpe = ByteBPE(model_path)
            self.sp = None
            self.eod = self._bpe.eod
            return
        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.eod = self.sp.piece_to_id(EOD_TOKEN)
        if self.sp.id_to_piece(self.eod) != EOD_TOKEN:
            raise UserError(f"tokenizer {model_path!r} has no {EOD_TOKEN} token; was it trained by gptforge?")
        self._mark_bytes = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]

    @property
    def vocab_size(self) -> int:
        if self._bpe is not None:
            return self._bpe.vocab_size
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self._bpe is not None:
            return self._bpe.encode(text)
        if _SPACE_MARK not in text:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_SPACE_MARK)):
            if i:
                ids.extend(self._mark_bytes)
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._bpe is not None:
            return self._bpe.encode_batch(texts)
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        if self._bpe is not None:
            return self._bpe.decode(ids)
        # Decode runs of ordinary pieces with SentencePiece; the byte tokens we emitted for U+2581
        # are turned back into that character here (SentencePiece would make them a space).
        out: list[str] = []
        run: list[int] = []
        i = 0
        mark = self._mark_bytes
        while i < len(ids):
            if ids[i : i + 3] == mark:
                out.append(self.sp.decode(run))
                run = []
                out.append(_SPACE_MARK)
                i += 3
            else:
                run.append(int(ids[i]))
                i += 1
        out.append(self.sp.decode(run))
        return "".join(out)

    def describe(self) -> dict:
        return {"path": os.path.abspath(self.path), "sha256": self.sha256, "vocab_size": self.vocab_size,
                "eod": self.eod, "kind": self.kind}


@dataclass(kw_only=True)
class TokenizerTrainResult:
    model_path: str
    vocab_size: int
    documents: int
    skips: SkipLog


def train_tokenizer(
    inputs: list[str],
    output_prefix: str,
    *,
    vocab_size: int,
    text_field: str = "text",
    max_documents: int | None = None,
    num_threads: int = 1,
    seed: int = 1234,
) -> TokenizerTrainResult:
    """Train a BPE model on the texts of ``inputs``; writes ``output_prefix``.model and .vocab atomically."""
    errors = check_input_files(inputs, "tokenizer train: input")
    if vocab_size < 384:
        errors.append(f"tokenizer train: --vocab-size must be >= 384 (256 byte tokens + merges), got {vocab_size}")
    if errors:
        raise UserError("\n".join(errors))
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    skips = SkipLog()
    documents = 0
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-tmp-") as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as handle:
            for path in inputs:
                for text in iter_texts(path, text_field, skips):
                    documents += 1
                    for line in text.splitlines():
                        if line.strip():
                            handle.write(line + "\n")
                    if max_documents is not None and documents >= max_documents:
                        break
                if max_documents is not None and documents >= max_documents:
                    break
        if documents == 0:
            raise UserError(f"tokenizer train: no documents with a {text_field!r} field in {inputs} ({skips.summary()})")
        tmp_prefix = os.path.join(tmp, "model")
        spm.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=tmp_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=16384,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            control_symbols=[EOD_TOKEN],
            num_threads=num_threads,
            minloglevel=2,
            train_extremely_large_corpus=False,
        )
        for ext in (".model", ".vocab"):
            src, dst = tmp_prefix + ext, output_prefix + ext
            with open(src, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(src, dst)
    tokenizer = Tokenizer(output_prefix + ".model")
    return TokenizerTrainResult(model_path=output_prefix + ".model", vocab_size=tokenizer.vocab_size,
                                documents=documents, skips=skips)


def train_tokenizer_of_kind(kind: str, inputs: list[str], output_prefix: str, *, vocab_size: int,
                            text_field: str = "text", max_documents: int | None = None,
                            num_threads: int = 1) -> TokenizerTrainResult:
    """``gptforge tokenizer train --kind KIND``: SentencePiece (``PREFIX.model``) or GPT-2's byte-level
    BPE (``PREFIX.json``, with ``PREFIX.vocab.json`` and ``PREFIX.merges.txt`` beside it)."""
    if kind == SENTENCEPIECE:
        return train_tokenizer(inputs, output_prefix, vocab_size=vocab_size, text_field=text_field,
                               max_documents=max_documents, num_threads=num_threads)
    if kind != BYTE_BPE:
        raise UserError(f"tokenizer train: --kind must be one of {', '.join(TOKENIZER_KINDS)}, got {kind!r}")
    if num_threads != 1:
        raise UserError("tokenizer train: --threads applies to --kind sentencepiece only (byte-bpe training "
                         "uses the tokenizers library's thread pool, sized by RAYON_NUM_THREADS)")
    from .byte_bpe import train_byte_bpe

    result = train_byte_bpe(inputs, output_prefix, vocab_size=vocab_size, text_field=text_field,
                            max_documents=max_documents)
    return TokenizerTrainResult(model_path=result.model_path, vocab_size=result.vocab_size,
                                documents=result.documents, skips=result.skips)
