"""SFT: loss only on assistant tokens, loss falls, start from a pre-training run, exact resume."""

from __future__ import annotations

import json

import torch

from longcat2.chat import render_with_mask
from longcat2.tokenizer import load_tokenizer
from longcat2.train.config import IGNORE, TrainConfig
from longcat2.train.metrics import read_metrics
from longcat2.train.sft import SFTTask
from longcat2.train.trainer import Trainer


def _cfg(prepared, chats, out, **kw) -> TrainConfig:
    base = dict(
        mode="sft", data=str(chats), tokenizer=str(prepared / "tokenizer"), out=str(out), steps=15, batch_size=4,
        seq_len=64, lr=3e-3, warmup=2, precision="fp32", progress=False, plot=False, save_every=0, eval_every=0,
        eval_batches=2, deterministic=True,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_labels_only_on_assistant_tokens(prepared, tool_chats):
    tok = load_tokenizer(prepared / "tokenizer")
    task = SFTTask(_cfg(prepared, tool_chats, "unused", seq_len=512), rank=0, world=1)
    assert len(task.train) + len(task.val) == 12 and task.report["bad"] == 0
    lines = [json.loads(line) for line in tool_chats.read_text().splitlines()]
    for rec, (x, y) in zip(lines[:6], [task.collate([e]) for e in _all_in_file_order(task, tok, lines[:6])]):
        ids, mask = render_with_mask(rec["messages"], rec.get("tools"), tok)
        x, y = x[0].tolist(), y[0].tolist()
        assert x == ids[:-1]
        for t, label in enumerate(y):
            if mask[t + 1]:
                assert label == ids[t + 1]
            else:
                assert label == IGNORE
        trained = tok.decode([v for v in y if v != IGNORE])
        answers = [m for m in rec["messages"] if m["role"] == "assistant"]
        assert answers[-1]["content"] in trained
        assert rec["messages"][0]["content"] not in trained  # the user's question is never a target
        assert trained.count("</longcat_s>") == len(answers)  # each reply's terminator is trained
        if rec.get("tools"):
            assert "<longcat_tool_call>" in trained and "add" in trained  # tool calls are assistant tokens
            assert "<longcat_tool_response>" not in trained


def _all_in_file_order(task, tok, recs):
    from longcat2.train.sft import encode_example

    return [encode_example(r["messages"], r.get("tools"), tok, task.cfg.seq_len)[:2] for r in recs]


def test_first_token_labels_are_each_replys_first_token(prepared, tool_chats):
    """--first-token-loss trains the first token of every assistant reply: a tool call's tag or the first
    token of the content, one per reply, nothing of the prompt."""
    from longcat2.train.loss import first_token_labels

    tok = load_tokenizer(prepared / "tokenizer")
    task = SFTTask(_cfg(prepared, tool_chats, "unused", seq_len=512), rank=0, world=1)
    lines = [json.loads(line) for line in tool_chats.read_text().splitlines()]
    for rec, example in zip(lines[:6], _all_in_file_order(task, tok, lines[:6])):
        _, y = task.collate([example])
        first = [v for v in first_token_labels(y)[0].tolist() if v != IGNORE]
        answers = [m for m in rec["messages"] if m["role"] == "assistant"]
        assert len(first) == len(answers)
        for got, reply in zip(first, answers):
            text = (
                "<longcat_tool_call>"
                if reply.get("tool_calls") and not reply.get("content")
                else reply["content"]
            )
            assert tok.decode([got]).strip() and text.startswith(tok.decode([got]).strip())


def test_first_token_loss_is_recorded(prepared, chats, tmp_path):
    t = Trainer(_cfg(prepared, chats, tmp_path / "ftl", steps=2, first_token_loss=2.0))
    assert t.train() == 0
    recs = [r for r in read_metrics(tmp_path / "ftl" / "metrics.jsonl") if r["type"] == "train"]
    assert len(recs) == 2 and all(r["first_token_loss"] > 0 for r in recs)
    assert all(r["total_loss"] > r["loss"] + 2.0 * r["first_token_loss"] - 1e-3 for r in recs)


def test_padding_and_batches(prepared, chats):
    task = SFTTask(_cfg(prepared, chats, "unused"), rank=0, world=1)
    x, y = task.next_batch()
    assert x.shape == y.shape and x.shape[0] == 4
    lengths = [len(e[0]) for e in task.train]
    assert x.shape[1] <= max(lengths)
    assert (y[x == task.pad_id] == IGNORE).all()  # padding is never a target


def test_sft_steps_reduce_loss(prepared, chats, tmp_path):
    t = Trainer(_cfg(prepared, chats, tmp_path / "sft", steps=15, eval_every=15))
    assert t.train() == 0
    recs = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    train = [r["loss"] for r in recs if r["type"] == "train"]
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3 - 1.0, train
    assert any(r["type"] == "eval" for r in recs)


def test_sft_from_pretrain_checkpoint_and_exact_resume(prepared, chats, tmp_path):
    pre = tmp_path / "pre"
    pt = Trainer(
        TrainConfig(
            data=str(prepared),
            out=str(pre),
            steps=3,
            batch_size=2,
            seq_len=32,
            precision="fp32",
            progress=False,
            plot=False,
            save_every=0,
            eval_every=0,
        )  # fmt: skip
    )
    assert pt.train() == 0
    # tokenizer comes from the checkpoint; weights too
    kw = dict(tokenizer=None, init=str(pre), steps=6, save_every=3)
    full = Trainer(_cfg(prepared, chats, tmp_path / "full", **kw))
    assert torch.equal(full.model.lm_head.weight, pt.model.lm_head.weight)
    assert full.train() == 0
    half = Trainer(_cfg(prepared, chats, tmp_path / "half", **{**kw, "steps": 3}))
    assert half.train() == 0
    resumed = Trainer(
        _cfg(prepared, chats, tmp_path / "half", **{**kw, "resume": True}), explicit={"steps", "resume"}
    )
    assert resumed.step == 3
    assert resumed.train() == 0

    def losses(p):
        return [r["loss"] for r in read_metrics(p / "metrics.jsonl") if r["type"] == "train"]

    assert losses(tmp_path / "full") == losses(tmp_path / "half")


def test_bad_lines_are_counted(prepared, tmp_path, make_chats):
    path = make_chats(tmp_path / "c.jsonl", n=5)
    with open(path, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")  # nothing to learn
        f.write(json.dumps({"nope": 1}) + "\n")
    task = SFTTask(_cfg(prepared, path, "unused"), rank=0, world=1)
    assert task.report["bad"] == 2 and task.report["no_assistant"] == 1
    assert len(task.train) == 5


def test_group_by_length_sees_every_conversation_once_with_less_padding_and_resumes(prepared, tmp_path):
    import random

    rng = random.Random(0)
    path = tmp_path / "mixed.jsonl"
    with open(path, "w") as f:
        for i in range(200):  # 1 to 60 words: 200 conversations of very different lengths
            words = " ".join(
                rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(1, 60))
            )
            msgs = [
                {"role": "user", "content": f"Echo {i}: {words}"},
                {"role": "assistant", "content": words},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    kw = dict(seq_len=512, batch_size=4, val_data=str(path))
    grouped = SFTTask(_cfg(prepared, path, "unused", group_by_length=True, **kw), rank=0, world=1)
    plain = SFTTask(_cfg(prepared, path, "unused", **kw), rank=0, world=1)
    steps = len(grouped.train) // 4

    def epoch(task):
        return [task.next_batch()[0] for _ in range(steps)]

    def rows(batches):
        return sorted(tuple(r[r != grouped.pad_id].tolist()) for x in batches for r in x)

    g, p = epoch(grouped), epoch(plain)
    assert rows(g) == rows(p) == sorted(tuple(x) for x, _ in grouped.train)  # each conversation once
    real = sum(len(x) for x, _ in grouped.train)
    assert sum(x.numel() for x in g) < 1.1 * real < 1.1 / 1.4 * sum(x.numel() for x in p)  # padded tokens
    assert [x.shape[1] for x in g] != sorted((x.shape[1] for x in g), reverse=True)  # steps are shuffled
    assert grouped.epoch == 1 and grouped.next_batch()[0].tolist() != g[0].tolist()  # a new order each epoch
    # resume: the (epoch, index) state gives the same batches
    again = SFTTask(_cfg(prepared, path, "unused", group_by_length=True, **kw), rank=0, world=1)
    again.load_state_dict({**grouped.state_dict(), "epoch": 0, "index": 4 * 7})
    assert all(torch.equal(a, b) for a, b in zip([again.next_batch()[0] for _ in range(5)], g[7:12]))
