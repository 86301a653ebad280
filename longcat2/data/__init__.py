"""Training data on disk: corpus → token shards → batches.

Modules: `writer` (`prepare`: tokenize a corpus into `train.bin`/`val.bin` + `meta.json`), `shards` (the
format and reading it back: `read_meta`, `load_split`, `TokenShards`), `sampler` (`BatchSampler`:
deterministic, resumable windows), `cache` (`ensure_prepared`: raw `--data` prepared once into a locked
cache folder, training a tokenizer on first use), `cli` (`longcat2 prepare`). Corpus reading is
`longcat2.corpus`; the tokenizer is `longcat2.tokenizer`.
"""

from longcat2.corpus import DataError
from longcat2.data.cache import DEFAULT_STDLIB_BYTES, default_cache_dir, ensure_prepared
from longcat2.data.sampler import BatchSampler
from longcat2.data.shards import FORMAT_VERSION, TokenShards, load_split, read_meta
from longcat2.data.writer import DEFAULT_VAL_FRACTION, prepare

__all__ = [
    "DEFAULT_STDLIB_BYTES",
    "DEFAULT_VAL_FRACTION",
    "FORMAT_VERSION",
    "BatchSampler",
    "DataError",
    "TokenShards",
    "default_cache_dir",
    "ensure_prepared",
    "load_split",
    "prepare",
    "read_meta",
]
