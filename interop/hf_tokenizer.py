"""The tokenizer files of an exported Hugging Face folder, for either gptforge tokenizer kind.

Byte-level BPE (``--kind byte-bpe``) is GPT-2's own scheme: the folder gets GPT-2's ``vocab.json`` and
``merges.txt`` (what ``GPT2Tokenizer`` reads) and the same tokenizer as one ``tokenizer.json``.

SentencePiece BPE with byte fallback (the default kind) has no GPT-2 equivalent: it is converted to a
``tokenizers`` BPE with byte fallback in ``tokenizer.json`` (loaded by ``AutoTokenizer`` and
``pipeline``). The conversion stores SentencePiece's space mark U+2581 as a plain space in every piece
and merge, so a literal U+2581 in the text is not in the vocabulary and falls back to its three UTF-8
byte tokens, exactly as ``gptforge.data_prep.tokenization.tokenizer.Tokenizer`` encodes it.

Both kinds set ``split_special_tokens``: ``<|endoftext|>`` typed in text is encoded as ordinary text,
as gptforge did for the training data (the model only ever saw it as the document separator).
"""

from __future__ import annotations

import json
import os
import shutil

from ..data_prep.tokenization.byte_bpe import EOD_TOKEN, write_vocab_and_merges
from ..data_prep.tokenization.tokenizer import BYTE_BPE, Tokenizer

SPACE_MARK = "\u2581"
SPM_UNK = "<unk>"

SENTENCEPIECE_README = f"""\
## Tokenizer

This model was trained with a SentencePiece BPE tokenizer with byte fallback (gptforge's default
tokenizer), not with GPT-2's byte-level BPE. Its vocabulary is text pieces plus 256 byte tokens
`<0x00>`..`<0xFF>` for whatever the pieces do not cover, where GPT-2's byte-level BPE first maps every
byte to a printable character and merges those. One scheme cannot be written in the other's files, so
this folder has no `vocab.json`/`merges.txt`, and **`GPT2Tokenizer` must not be used with it**: with
transformers 4 `GPT2Tokenizer.from_pretrained(folder)` fails for lack of those two files; with
transformers 5 it loads, but wraps this vocabulary in GPT-2's byte-level pipeline and turns text into
ids the model was never trained on.

Load the tokenizer with `AutoTokenizer.from_pretrained(folder)` (or `PreTrainedTokenizerFast`), or
pass the folder to `pipeline("text-generation", model=folder)`: they read `tokenizer.json`, which
encodes and decodes exactly like the gptforge tokenizer (identity normalisation, spaces kept, no
added prefix space, byte fallback, a literal U+2581 `{SPACE_MARK}` encoded as its three byte tokens).
`{EOD_TOKEN}` is the end-of-text (eos and bos) token; as in training, typing it in text does not
produce it (`split_special_tokens`).
"""

BYTE_BPE_README = f"""\
## Tokenizer

GPT-2's byte-level BPE: `vocab.json` and `merges.txt` for `GPT2Tokenizer.from_pretrained(folder)`,
the same tokenizer as `tokenizer.json` for `AutoTokenizer` and `pipeline`. `{EOD_TOKEN}` is the
end-of-text (eos and bos) token; as in training, typing it in text does not produce it
(`split_special_tokens`).
"""


def _common_config(context_length: int) -> dict:
    # clean_up_tokenization_spaces would rewrite " ," to "," on decode: not what the model produced.
    return {"model_max_length": context_length, "clean_up_tokenization_spaces": False,
            "split_special_tokens": True}


def sentencepiece_to_tokenizers(model_path: str):
    """Our SentencePiece model -> an equivalent ``tokenizers.Tokenizer`` (BPE with byte fallback).

    SentencePiece BPE merges, at each step, the adjacent pair whose joined piece has the highest score;
    ``tokenizers`` applies merges by rank. Every way of splitting a piece into two pieces becomes a
    merge, ranked by the joined piece's score, so both pick the same merge at every step."""
    from tokenizers import AddedToken, decoders
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    sp = Tokenizer(model_path).sp
    vocab: dict[str, int] = {}
    scores: dict[str, float] = {}
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i):
            token = piece  # "<unk>", "<|endoftext|>", "<0x41>": kept as they are
        else:
            token = piece.replace(SPACE_MARK, " ")
            scores[token] = sp.get_score(i)
        if token in vocab:
            raise ValueError(f"tokenizer {model_path!r}: pieces {vocab[token]} and {i} both read {token!r} "
                             f"once U+2581 is a space; it cannot be exported")
        vocab[token] = i
    merges = []
    for token, score in scores.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in scores and right in scores:
                merges.append((-score, vocab[token], vocab[left], left, right))
    merges.sort()
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], unk_token=SPM_UNK,
                                byte_fallback=True, fuse_unk=False))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens([AddedToken(SPM_UNK, special=True), AddedToken(EOD_TOKEN, special=True)])
    return hf


def write_hf_tokenizer(tokenizer_path: str, out_dir: str, *, context_length: int) -> str:
    """Write the tokenizer files of ``tokenizer_path`` (either kind) into ``out_dir``; returns the
    README section that explains them."""
    tok = Tokenizer(tokenizer_path)
    if tok.kind == BYTE_BPE:
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
        write_vocab_and_merges(tokenizer_path, os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"))
        special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "errors": "replace"} | special
        readme = BYTE_BPE_README
    else:
        sentencepiece_to_tokenizers(tokenizer_path).save(os.path.join(out_dir, "tokenizer.json"))
        special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": SPM_UNK}
        config = {"tokenizer_class": "PreTrainedTokenizerFast"} | special
        readme = SENTENCEPIECE_README
    for name, content in (("tokenizer_config.json", config | _common_config(context_length)),
                          ("special_tokens_map.json", special)):
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2, ensure_ascii=False)
    return readme
