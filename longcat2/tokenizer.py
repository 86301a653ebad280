"""Byte-level BPE tokenizer: training, saving in the Hugging Face layout, loading, incremental decoding.

Design choices:
- Trained with the Hugging Face `tokenizers` library (Rust; no other dependency). Byte-level: every
  string encodes, nothing maps to `<unk>` (it exists only because HF tooling expects an unk token).
- Pre-tokenization splits with the GPT-4 (cl100k) regex (contractions, letter runs, 1-3 digit groups,
  punctuation runs, whitespace runs) and then maps bytes to the GPT-2 byte alphabet, so code
  indentation and long numbers tokenize sensibly.
- Special tokens take the first ids, in `SPECIAL_TOKENS` order: 0 `<unk>`, 1 `<s>` (BOS), 2
  `</longcat_s>` (EOS), 3 `<pad>`, then the chat/tool tags. That matches the model config defaults
  (bos/eos/pad = 1/2/3). EOS is `</longcat_s>`, the chat turn terminator, so one id ends both a
  pre-training document and an assistant turn and generation stops on it either way.
- Every special token is a single id in both directions and is matched anywhere in input text by `encode`
  (so a rendered chat transcript tokenizes with its tags as single ids). `encode_plain_batch` is for text
  from a request: it never matches special tokens (a second backend with `encode_special_tokens` on), and
  it releases the GIL while it works, so a huge prompt tokenised in a worker thread does not stall the
  server's event loop or engine thread. Nothing is added implicitly:
  `encode` adds BOS/EOS only when asked, and the saved `tokenizer.json` has no post-processor, so
  `transformers` encodes the same ids as `Tokenizer.encode`.
- A directory holds `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json`, which
  `transformers.PreTrainedTokenizerFast.from_pretrained(dir)` loads with bos/eos/pad/unk set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from longcat2.corpus import read_file_documents

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</longcat_s>", "<pad>"
CHAT_TOKENS = (
    "<longcat_system>",
    "<longcat_user>",
    "<longcat_assistant>",
    "<longcat_think>",
    "</longcat_think>",
    "<longcat_tool_call>",
    "</longcat_tool_call>",
    "<longcat_arg_key>",
    "</longcat_arg_key>",
    "<longcat_arg_value>",
    "</longcat_arg_value>",
    "<longcat_tool_response>",
    "</longcat_tool_response>",
)
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, *CHAT_TOKENS)  # id i = SPECIAL_TOKENS[i]
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # byte alphabet + specials; merges fill the rest

# GPT-4 (cl100k_base) split pattern.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(ValueError):
    """A tokenizer directory or training request is invalid; the message names the file or argument."""


def _new_backend() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _texts(
    files_or_texts: Iterable[str | Path], max_bytes: int | None, on_skip: Callable[[Path, str], None] | None
) -> Iterator[str]:
    """Paths are read as corpus files (text, or `.jsonl` with a `text` field); plain strings are texts."""
    used = 0
    for item in files_or_texts:
        if isinstance(item, Path):
            docs, reason = read_file_documents(item)
            if reason is not None and on_skip is not None:
                on_skip(item, reason)
        else:
            docs = [item]
        for doc in docs:
            if max_bytes is not None and used >= max_bytes:
                return
            used += len(doc.encode("utf-8"))
            yield doc


def train_tokenizer(
    files_or_texts: Iterable[str | Path],
    vocab_size: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 2,
    max_bytes: int | None = None,
    model_max_length: int = 1_048_576,
    on_skip: Callable[[Path, str], None] | None = None,
) -> Path:
    """Train a byte-level BPE on the given corpus and save it to `out_dir`; returns `out_dir`.

    `files_or_texts` mixes `pathlib.Path` items (files read as corpus files: UTF-8 text, or `.jsonl`
    with a `text` field per line) and `str` items (used as texts). `vocab_size` counts the specials
    and the 256 byte tokens; a small corpus may yield fewer tokens (the merges run out).
    `max_bytes` stops reading once that many UTF-8 bytes of text were consumed. Files that cannot be
    used (unreadable, not UTF-8, empty) or bad jsonl lines are skipped and reported to `on_skip(path, reason)`.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size!r} is too small: need >= {MIN_VOCAB_SIZE} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if vocab_size > 2**32:
        raise TokenizerError(f"vocab_size={vocab_size} does not fit in uint32 token ids")
    if isinstance(files_or_texts, (str, Path)):
        raise TokenizerError("files_or_texts must be an iterable of paths/texts, not a single str or Path")
    tok = _new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]

    def counted() -> Iterator[str]:
        for text in _texts(files_or_texts, max_bytes, on_skip):
            seen[0] += 1
            yield text

    tok.train_from_iterator(counted(), trainer)
    if seen[0] == 0:
        raise TokenizerError("cannot train a tokenizer on an empty corpus (no texts were read)")
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise TokenizerError(
                f"internal error: special token {t} got id {tok.token_to_id(t)}, expected {i}"
            )
    return save_backend(tok, out_dir, model_max_length=model_max_length)


def save_backend(
    tok: tokenizers.Tokenizer, out_dir: str | Path, *, model_max_length: int = 1_048_576
) -> Path:
    """Write `tokenizer.json` + the `transformers` config files; files are replaced atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(CHAT_TOKENS)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": extra,  # transformers 4.x name
        "extra_special_tokens": extra,  # transformers 5.x name
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": extra,
    }
    texts = {
        "tokenizer.json": tok.to_str(pretty=False),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n",
    }
    for name, text in texts.items():
        tmp = out / f".{name}.tmp-{os.getpid()}"  # open() (not mkstemp's 0600): the umask's mode
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
    return out


class DecodeStream:
    """Incremental detokenizer: `step(id)` returns the newly completed text ("" while a UTF-8 character
    is still incomplete). Special tokens are kept, so a chat `StreamParser` can see the tags."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._backend = tokenizer.backend
        self._stream = decoders.DecodeStream(skip_special_tokens=False)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, int(token_id)) or ""


class Tokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with the LongCat special ids."""

    def __init__(self, backend: tokenizers.Tokenizer, path: Path | None = None) -> None:
        self.backend = backend
        self.path = path
        ids = {t: backend.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            where = f" in {path}" if path else ""
            raise TokenizerError(f"tokenizer{where} lacks special token(s) {missing}")
        self.special_ids: dict[str, int] = ids  # type: ignore[assignment]
        self.unk_id, self.bos_id, self.eos_id, self.pad_id = (ids[t] for t in (UNK, BOS, EOS, PAD))
        self._plain: tokenizers.Tokenizer | None = None
        self._max_token_chars: int | None = None

    @property
    def max_token_chars(self) -> int:
        """The longest token in characters: a text of n characters has at least n / this many tokens
        (every character is at least one byte, every byte-level token at most this many bytes)."""
        if self._max_token_chars is None:
            self._max_token_chars = max(len(t) for t in self.backend.get_vocab(with_added_tokens=True))
        return self._max_token_chars

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_plain_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, special-token spellings encoded as ordinary text (releases the GIL)."""
        if self._plain is None:
            plain = tokenizers.Tokenizer.from_str(self.backend.to_str())
            plain.encode_special_tokens = True
            self._plain = plain
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def encode_batch(self, texts: Sequence[str], *, add_eos: bool = False) -> list[list[int]]:
        out = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if add_eos:
            for ids in out:
                ids.append(self.eos_id)
        return out

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self) -> DecodeStream:
        return DecodeStream(self)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def save(self, out_dir: str | Path) -> Path:
        return save_backend(self.backend, out_dir)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer directory (or a `tokenizer.json` file) written by `train_tokenizer`."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise TokenizerError(f"no tokenizer at {p}: expected a directory containing tokenizer.json")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise TokenizerError(f"cannot read {file}: {e}") from e
    return Tokenizer(backend, path=file.parent)
