"""Perplexity / bits-per-byte on real shards, and the eval CLI end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch

from longcat2.cli import build_parser
from longcat2.config import ModelConfig
from longcat2.data import prepare
from longcat2.evals.ppl import evaluate_ppl
from longcat2.model.longcat import LongCatForCausalLM
from longcat2.tokenizer import train_tokenizer


def test_ppl_and_bits_per_byte(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.py").write_text(
            "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(80))
        )
    tok = train_tokenizer(sorted(corpus.glob("*.py")), 300, tmp_path / "tok")
    shards = tmp_path / "shards"
    prepare(corpus, tok, shards, val_fraction=0.34, seed=0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=300, mtp_num_layers=0)
    model = LongCatForCausalLM(cfg).eval()
    res = evaluate_ppl(model, shards, seq_len=64, batch_size=2, trailing=8)
    assert abs(res["val_loss"] - math.log(300)) < 0.2  # an untrained model is near uniform
    assert res["bits_per_byte"] > 0 and res["trailing_loss"] > 0 and res["tokens"] == res["windows"] * 64
    with torch.no_grad():  # zero logits: exactly the uniform distribution
        model.lm_head.weight.zero_()
    uniform = evaluate_ppl(model, shards, seq_len=64)
    assert abs(uniform["val_loss"] - math.log(300)) < 1e-5
    meta_bpt = res["val_loss"] / math.log(2) / res["bits_per_byte"]  # bytes per token implied
    assert abs(uniform["bits_per_byte"] - math.log2(300) / meta_bpt) < 1e-6


def test_eval_longctx_cli_json(tmp_path):
    png = tmp_path / "h.png"
    out = subprocess.run(
        [sys.executable, "-m", "longcat2", "eval", "longctx", "--preset", "tiny", "--task", "passkey",
         "--lengths", "96", "160", "--depths", "2", "--per-cell", "1", "--json", "--heatmap", str(png)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    res = json.loads(out.stdout)
    assert res["lengths"] == [96, 160] and res["depths"] == [0.0, 1.0]
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("words", [["96", "160"], ["96,160"], ["96,", "160"], ["96", "160,96"]])
def test_longctx_lengths_take_spaces_and_commas(words):
    args = build_parser().parse_args(["eval", "longctx", "--preset", "tiny", "--lengths", *words])
    assert [n for word in args.lengths for n in word][:2] == [96, 160]


def test_longctx_bad_lengths_are_an_argparse_error(capsys):
    for bad in ("96,x", "0"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", "longctx", "--lengths", bad])
        assert "--lengths" in capsys.readouterr().err
