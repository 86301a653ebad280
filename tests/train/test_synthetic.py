"""Synthetic-task training data and the LSA stage switches of the trainer."""

import pytest
import torch

from longcat2.train.config import TrainConfig
from longcat2.train.synthetic import SyntheticTask, parse_task_spec
from longcat2.train.trainer import Trainer


def test_task_spec_parsing_and_errors():
    assert parse_task_spec("task:passkey+mqar:n_pairs=8") == (["passkey", "mqar"], {"n_pairs": 8})
    with pytest.raises(ValueError, match="unknown task"):
        parse_task_spec("task:sudoku")
    with pytest.raises(ValueError, match="key=value"):
        parse_task_spec("task:mqar:n_pairs")


def test_batches_are_deterministic_resumable_and_masked():
    a = SyntheticTask("task:passkey+niah", batch_size=3, seq_len=100, seed=5)
    first = [a.next_batch() for _ in range(3)]
    b = SyntheticTask("task:passkey+niah", batch_size=3, seq_len=100, seed=5)
    b.next_batch()
    state = b.state_dict()
    c = SyntheticTask("task:passkey+niah", batch_size=3, seq_len=100, seed=5)
    c.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(first[1:], [c.next_batch() for _ in range(2)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x, y = first[0]
    assert x.shape == y.shape == (3, 100)
    answered = y != -100
    assert 0 < answered.sum() <= 3 * 5  # only answer tokens carry loss (passkey 5 digits, niah 3 values)
    assert torch.equal(x[:, 1:][answered[:, :-1]], y[:, :-1][answered[:, :-1]])  # labels are next tokens
    with pytest.raises(ValueError, match="trained on"):
        SyntheticTask("task:mqar", 3, 100, 5).load_state_dict(state)


def test_indexer_warmup_stage_trains_only_the_indexer(tmp_path):
    cfg = TrainConfig(
        preset="tiny", data="task:passkey", seq_len=96, batch_size=2, steps=2, out=str(tmp_path / "run"),
        train_only="indexer", attention="dense", indexer_loss=1.0, indexer_warmup=10, mtp_weight=0.0,
        save_every=0, eval_every=0, progress=False, plot=False, threads=1,
    )  # fmt: skip
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    bias = [m.router.e_score_correction_bias.clone() for m in trainer.moes]
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".indexer." in n for n in changed)
    assert all(torch.equal(m.router.e_score_correction_bias, b) for m, b in zip(trainer.moes, bias))
    assert all(not m.sparse_enabled for m in trainer.model.modules() if hasattr(m, "sparse_enabled"))


def test_init_applies_shape_preserving_overrides_and_rejects_others(tmp_path):
    base = dict(
        preset="tiny", data="task:passkey", seq_len=96, batch_size=2, steps=1, save_every=0, eval_every=0,
        progress=False, plot=False, threads=1, mtp_weight=0.0,
    )  # fmt: skip
    Trainer(TrainConfig(**base, out=str(tmp_path / "a"))).train()
    t = Trainer(
        TrainConfig(
            **base, out=str(tmp_path / "b"), init=str(tmp_path / "a"), model_overrides={"index_topk": 32}
        )
    )
    assert t.model.config.index_topk == 32
    assert all(m.cfg.index_topk == 32 for m in t.model.modules() if hasattr(m, "sparse_enabled"))
    with pytest.raises(Exception, match="changes the weights"):
        Trainer(
            TrainConfig(
                **base, out=str(tmp_path / "c"), init=str(tmp_path / "a"), model_overrides={"hidden_size": 32}
            )
        )


def test_prepared_task_files_hold_the_stream_rows_and_resume_exactly(tmp_path):
    from longcat2.cli import main
    from longcat2.train.synthetic import PreparedTask

    out = tmp_path / "tasks"
    assert main(["prepare", "--task", "passkey+niah", "--seq-len", "100", "--examples", "10",
                 "--val-examples", "4", "--seed", "3", "--out", str(out)]) == 0  # fmt: skip
    live = SyntheticTask("task:passkey+niah", batch_size=2, seq_len=100, seed=3)
    files = PreparedTask(out, batch_size=2, seq_len=100, seed=3)
    for (x1, y1), (x2, y2) in zip(live.eval_batches(2), files.eval_batches(2)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)  # val rows = the evaluation stream, in order
    # one epoch of 5 batches covers the 10 training rows once; the next epoch is another permutation
    live_rows = {tuple(live.rows.row(0, i)[0][:-1].tolist()) for i in range(10)}  # x = row[:-1]
    epoch1 = [files.next_batch()[0] for _ in range(5)]
    seen = [tuple(r.tolist()) for x in epoch1 for r in x]
    assert set(seen) == live_rows and len(seen) == 10
    epoch2 = [tuple(r.tolist()) for _ in range(5) for r in files.next_batch()[0]]
    assert set(epoch2) == live_rows and epoch2 != seen
    files = PreparedTask(out, batch_size=2, seq_len=100, seed=3)
    files.next_batch()
    state = files.state_dict()
    after = [files.next_batch() for _ in range(3)]
    again = PreparedTask(out, batch_size=2, seq_len=100, seed=3)
    again.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(after, [again.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # shorter windows keep the (right-aligned) answers; longer ones are an error that names the fix
    x, y = PreparedTask(out, batch_size=2, seq_len=60, seed=3).next_batch()
    assert x.shape == (2, 60) and (y != -100).any(dim=1).all()
    with pytest.raises(ValueError, match="--seq-len 200"):
        PreparedTask(out, batch_size=2, seq_len=200, seed=3)


def test_trainer_reads_a_prepared_task_folder(tmp_path, umask_027):
    from longcat2.train.synthetic import prepare_task_files

    prepare_task_files("task:passkey", tmp_path / "tasks", seq_len=96, n_train=8, n_val=4)
    umask_027(tmp_path / "tasks")
    cfg = TrainConfig(
        preset="tiny", data=str(tmp_path / "tasks"), seq_len=96, batch_size=2, steps=2, out=str(tmp_path / "run"),
        mtp_weight=0.0, save_every=0, eval_every=2, eval_batches=2, progress=False, plot=False, threads=1,
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.model.config.vocab_size == 256
    trainer.train()
    with pytest.raises(Exception, match="not a prepared task folder|no meta.json"):
        from longcat2.train.synthetic import PreparedTask

        PreparedTask(tmp_path, 2, 96, 0)
