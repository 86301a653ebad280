"""Perplexity / bits-per-byte on real shards, and the eval CLI end to end."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longcat2.cli import build_parser
from longcat2.config import ModelConfig
from longcat2.data import load_split, prepare, read_meta
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
    # Expected values, computed here window by window from the val split and the val files' bytes.
    tokens = np.asarray(load_split(shards, "val"), dtype=np.int64)
    n = (len(tokens) - 1) // 64
    with torch.no_grad():
        nll = torch.stack(
            [
                F.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="none")
                for w in (torch.from_numpy(tokens[r * 64 : (r + 1) * 64 + 1]) for r in range(n))
            ]
        )  # [windows, 64]
    val_bytes = sum(len((corpus / f).read_bytes()) for f in read_meta(shards)["val_files"])
    assert res["windows"] == n and res["tokens"] == n * 64
    assert abs(res["val_loss"] - float(nll.mean())) < 1e-5
    assert abs(res["trailing_loss"] - float(nll[:, -8:].mean())) < 1e-5
    assert abs(res["bits_per_byte"] - res["val_loss"] / math.log(2) * len(tokens) / val_bytes) < 1e-9
    with torch.no_grad():  # zero logits: exactly the uniform distribution
        model.lm_head.weight.zero_()
    uniform = evaluate_ppl(model, shards, seq_len=64)
    assert abs(uniform["val_loss"] - math.log(300)) < 1e-5
    assert abs(uniform["bits_per_byte"] - math.log2(300) * len(tokens) / val_bytes) < 1e-5


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
