"""Fixtures for the server tests (helpers and the memorising fine-tune live in `serve_helpers.py`)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from serve_helpers import GREETING, SCRIPT_DOC, WEATHER_ANSWER, ServerThread, memorise, scripted_state

from longcat2.serve import ServerConfig, create_app, load_state
from longcat2.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random LongCat-2.0-architecture model with a BPE trained in the fixture, in one directory."""
    out = tmp_path_factory.mktemp("tiny-model")
    texts = [
        inspect.getsource(json),
        inspect.getsource(inspect),
        SCRIPT_DOC,
        GREETING,
        WEATHER_ANSWER,
    ]
    train_tokenizer(texts, 700, out)
    tok = load_tokenizer(out)
    from longcat2.config import ModelConfig
    from longcat2.model.longcat import LongCatForCausalLM

    torch.manual_seed(0)
    model = LongCatForCausalLM(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def memorised_dir(model_dir, tmp_path_factory) -> Path:
    """A tiny model fine-tuned (in the fixture) to answer the scripted conversations exactly under greedy
    decoding through the real engine; same tokenizer as `model_dir`."""
    return memorise(model_dir, tmp_path_factory.mktemp("memorised-model"))


@pytest.fixture(scope="module")
def scripted_server(memorised_dir) -> Iterator[ServerThread]:
    state = scripted_state(memorised_dir)
    with ServerThread(create_app(state), state) as srv:
        yield srv


@pytest.fixture(scope="module")
def real_server(model_dir) -> Iterator[ServerThread]:
    state = load_state(ServerConfig(model_dir=model_dir, max_batch=8, max_queue=8, default_temperature=0.0))
    with ServerThread(create_app(state), state) as srv:
        yield srv
