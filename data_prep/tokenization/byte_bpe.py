"""GPT-2's byte-level BPE, trained and run with the ``tokenizers`` library.

Text is split by GPT-2's pre-tokenization regex, each piece's UTF-8 bytes are mapped to 256 printable
characters (so every string is covered, nothing is ever unknown), and merges learned on the corpus join
them. ``<|endoftext|>`` is the one special token: it separates documents in the token stream and, as
with the SentencePiece kind, is never produced from text (typed text containing it is encoded as
ordinary characters).

A trained tokenizer is one ``tokenizer.json`` file (what ``Tokenizer(path)`` and checkpoints use);
GPT-2's ``vocab.json`` and ``merges.txt`` are derived from it, beside it at training time and in an
exported Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from ...common.errors import UserError
from ..readers.documents import SkipLog, check_input_files, iter_texts

EOD_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 257  # the 256 byte symbols and <|endoftext|>
MERGES_HEADER = "#version: 0.2"  # the first line of GPT-2's merges.txt


def is_tokenizers_json(path: str) -> bool:
    """Whether ``path`` holds a ``tokenizers`` JSON file (a SentencePiece model is a binary protobuf):
    decided by content, so a copy under any name is recognised."""
    with open(path, "rb") as handle:
        head = handle.read(64).lstrip()
    return head.startswith(b"{")


class ByteBPE:
    """A byte-level BPE ``tokenizer.json`` with our conventions (``<|endoftext|>`` as the separator)."""

    def __init__(self, path: str) -> None:
        try:
            self.hf = HFTokenizer.from_file(path)
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise UserError(f"tokenizer {path!r} is not a readable tokenizers JSON file: {err}") from err
        spec = json.loads(self.hf.to_str())
        model_type, pre_tokenizer = spec["model"]["type"], (spec.get("pre_tokenizer") or {}).get("type")
        if model_type != "BPE" or pre_tokenizer != "ByteLevel":
            raise UserError(f"tokenizer {path!r} is a tokenizers file but not a byte-level BPE (model {model_type}, "
                             f"pre-tokenizer {pre_tokenizer}); train one with 'gptforge tokenizer train --kind byte-bpe'")
        eod = self.hf.token_to_id(EOD_TOKEN)
        if eod is None:
            raise UserError(f"tokenizer {path!r} has no {EOD_TOKEN} token; was it trained by gptforge?")
        self.eod: int = eod
        # Special tokens typed in text stay text, as SentencePiece treats its control tokens.
        self.hf.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        # <|endoftext|> decodes to nothing, like SentencePiece's control tokens.
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


def vocab_and_merges(tokenizer_json: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary (token -> id, <|endoftext|> included) and merges (in rank order) of a
    byte-level BPE ``tokenizer.json``."""
    with open(tokenizer_json, encoding="utf-8") as handle:
        model = json.load(handle)["model"]
    # tokenizers writes merges as [left, right] pairs; files from older versions hold "left right".
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return dict(model["vocab"]), merges


def write_vocab_and_merges(tokenizer_json: str, vocab_path: str, merges_path: str) -> None:
    """GPT-2's two files (what ``GPT2Tokenizer`` reads) from a byte-level BPE ``tokenizer.json``."""
    vocab, merges = vocab_and_merges(tokenizer_json)
    with open(vocab_path, "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as handle:
        handle.write(MERGES_HEADER + "\n")
        handle.writelines(f"{left} {right}\n" for left, right in merges)


def byte_bpe_from_vocab_and_merges(vocab: dict[str, int], merges: list[tuple[str, str]]) -> HFTokenizer:
    """GPT-2's pipeline around a vocabulary and merges: ByteLevel pre-tokenizer without a prefix space,
    ByteLevel decoder, <|endoftext|> special."""
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    _set_gpt2_pipeline(tok)
    return tok


def _set_gpt2_pipeline(tok: HFTokenizer) -> None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOD_TOKEN])


@dataclass(kw_only=True)
class ByteBPETrainResult:
    model_path: str
    """``PREFIX.json``: the single-file tokenizer that ``gptforge tokenize`` and training take."""
    vocab_path: str
    merges_path: str
    vocab_size: int
    documents: int
    skips: SkipLog


def train_byte_bpe(inputs: list[str], output_prefix: str, *, vocab_size: int, text_field: str = "text",
                   max_documents: int | None = None) -> ByteBPETrainResult:
    """Train GPT-2's byte-level BPE on the texts of ``inputs``; writes ``PREFIX.json`` (tokenizer.json
    format), ``PREFIX.vocab.json`` and ``PREFIX.merges.txt`` atomically."""
    errors = check_input_files(inputs, "tokenizer train: input")
    if vocab_size < MIN_VOCAB_SIZE:
        errors.append(f"tokenizer train: --vocab-size must be >= {MIN_VOCAB_SIZE} for --kind byte-bpe "
                      f"(256 byte symbols + {EOD_TOKEN}), got {vocab_size}")
    if errors:
        raise UserError("\n".join(errors))
    skips = SkipLog()
    counter = {"documents": 0}

    def texts():
        for path in inputs:
            for text in iter_texts(path, text_field, skips):
                if max_documents is not None and counter["documents"] >= max_documents:
                    return
                counter["documents"] += 1
                yield text

    tok = HFTokenizer(models.BPE(fuse_unk=False))
    _set_gpt2_pipeline(tok)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer=trainer)
    if counter["documents"] == 0:
        raise UserError(f"tokenizer train: no documents with a {text_field!r} field in {inputs} ({skips.summary()})")

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    outputs = {"model": output_prefix + ".json", "vocab": output_prefix + ".vocab.json",
               "merges": output_prefix + ".merges.txt"}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tokenizer-tmp-") as tmp:
        staged = {key: os.path.join(tmp, os.path.basename(path)) for key, path in outputs.items()}
        tok.save(staged["model"])
        write_vocab_and_merges(staged["model"], staged["vocab"], staged["merges"])
        for key, path in staged.items():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(path, outputs[key])
    trained = ByteBPE(outputs["model"])
    return ByteBPETrainResult(model_path=outputs["model"], vocab_path=outputs["vocab"], merges_path=outputs["merges"],
                              vocab_size=trained.vocab_size, documents=counter["documents"], skips=skips)
