"""Cached forward passes against the model's full (no-cache) forward, fp32."""

from __future__ import annotations

import contextlib

import pytest
import torch

from longcat2 import ModelConfig
from longcat2.engine.runner import ModelRunner, Segment
from longcat2.model.longcat import LongCatForCausalLM

ATOL = 3e-5  # logits are O(1) (initializer_range 0.1); one changed top-k index moves them by > 1e-2


def _model(preset: str, **overrides) -> LongCatForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset, initializer_range=0.1, **overrides)
    return LongCatForCausalLM(cfg).eval()


def _prefill(runner: ModelRunner, seq, ids: list[int], chunk: int) -> torch.Tensor:
    out = None
    for c0 in range(0, len(ids), chunk):
        c1 = min(len(ids), c0 + chunk)
        out = runner.forward([Segment(seq, torch.tensor(ids[c0:c1]), c0, "last")])
    return out.logits[0][0]


def _step_and_check(
    runner: ModelRunner, seqs: list, seqs_ids: list, done: list[int], widths: list[int], full
) -> None:
    """One step over every sequence (token lists complete): the next widths[i] tokens of sequence i from
    done[i] on (advanced); every row's logits against the model's full forward full[i]."""
    segs, spans = [], []
    for i, (seq, ids) in enumerate(zip(seqs, seqs_ids)):
        segs.append(Segment(seq, torch.tensor(ids[done[i] : done[i] + widths[i]]), done[i], "all"))
        spans.append((done[i], widths[i]))
        done[i] += widths[i]
    out = runner.forward(segs)
    for i, (s0, t) in enumerate(spans):
        torch.testing.assert_close(out.logits[i], full[i][s0 : s0 + t], rtol=0, atol=ATOL)


CASES = [
    ("tiny", {}, 150),  # LSA sparse path (index_topk 64), CLI, N-gram
    ("tiny", {}, 48),  # LSA model within index_topk: dense path
    ("tiny", {"cli_factor": 1}, 120),  # every sublayer owns an indexer
    ("tiny-flash", {}, 100),  # no LSA, no N-gram
    ("tiny-flash-lite", {}, 90),  # N-gram (mean fusion), no LSA
]


@pytest.mark.parametrize("preset,overrides,prompt_len", CASES)
def test_one_token_decode_equals_full_forward(preset: str, overrides: dict, prompt_len: int) -> None:
    model = _model(preset, **overrides)
    v = model.config.vocab_size
    ids = torch.randint(4, v, (prompt_len + 4,)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
    runner = ModelRunner(model, block_size=16, num_blocks=2)
    other = runner.new_sequence(ids)  # a second sequence interleaves its blocks with the first one's
    seq = runner.new_sequence(ids[:prompt_len])
    for c0 in range(0, prompt_len, 37):  # chunked prefill, the other sequence growing in between
        c1 = min(prompt_len, c0 + 37)
        runner.forward([Segment(other, torch.tensor(ids[c0 : c0 + 17]), c0, "none")])
        last = runner.forward([Segment(seq, torch.tensor(ids[c0:c1]), c0, "last")]).logits[0][0]
    torch.testing.assert_close(last, full[prompt_len - 1], rtol=0, atol=ATOL)
    for i in range(prompt_len, prompt_len + 4):
        seq.tokens.append(ids[i])
        out = runner.forward([Segment(seq, torch.tensor(ids[i : i + 1]), i, "last")])
        torch.testing.assert_close(out.logits[0][0], full[i], rtol=0, atol=ATOL)
    assert len(runner.cache.runs(seq.blocks, 0, prompt_len + 4)) > 1  # the reads crossed runs


def test_sparse_selection_equals_model_indices() -> None:
    model = _model("tiny")
    ids = torch.randint(4, 512, (1, 130))
    captured = {}

    def grab(module, args, out) -> None:
        captured["idx"] = out[1]

    hook = model.model.layers[1].self_attn[0].register_forward_hook(grab)
    with torch.no_grad():
        model(ids)
    hook.remove()
    runner = ModelRunner(model, block_size=32)
    seq = runner.new_sequence(ids[0].tolist())
    seen = []
    hook = model.model.layers[1].self_attn[0].register_forward_hook(lambda m, a, out: seen.append(out[1][0]))
    _prefill(runner, seq, ids[0].tolist(), chunk=70)  # both chunks see more than index_topk keys
    hook.remove()
    got = torch.cat(seen)  # [130, 64]: the engine's selection (one segment per step)
    assert torch.equal(got, captured["idx"][0])


@pytest.mark.parametrize("chunk", [1, 29, 200])
def test_chunked_prefill_equals_one_shot(chunk: int) -> None:
    model = _model("tiny")
    ids = torch.randint(4, 512, (140,)).tolist()
    ref_runner = ModelRunner(model, block_size=64)
    ref = ref_runner.new_sequence(ids)
    ref_logits = _prefill(ref_runner, ref, ids, chunk=140)
    runner = ModelRunner(model, block_size=16)
    seq = runner.new_sequence(ids)
    logits = _prefill(runner, seq, ids, chunk=chunk)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=ATOL)
    pos = torch.arange(140)
    for lid in range(len(runner.cache.latent)):
        a = runner.cache.latent[lid][runner.cache.slots(seq.blocks, pos)]
        b = ref_runner.cache.latent[lid][ref_runner.cache.slots(ref.blocks, pos)]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for lid in runner.cache.index_keys:
        a = runner.cache.index_keys[lid][runner.cache.slots(seq.blocks, pos)]
        b = ref_runner.cache.index_keys[lid][ref_runner.cache.slots(ref.blocks, pos)]
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefill_kernel", ["onednn", "flash", "tiled", "plain"])
def test_dense_kernels_long_rows_and_expanded_form(prefill_kernel: str) -> None:
    """Models without LSA: online-softmax dense decode and expanded-form prefill (the per-head oneDNN, CPU
    flash and tiled kernels and the plain reference) agree with the model."""
    model = _model("tiny-flash")
    ids = torch.randint(4, 512, (90,)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
    runner = ModelRunner(model, block_size=16, dense_gather_max=8, expanded_min_rows=4)
    runner.attention.prefill_kernel = prefill_kernel
    seq = runner.new_sequence(ids)
    last = _prefill(runner, seq, ids[:86], chunk=40)  # expanded form
    torch.testing.assert_close(last, full[85], rtol=0, atol=ATOL)
    out = runner.forward([Segment(seq, torch.tensor(ids[86:89]), 86, "all")])  # 3 rows: long dense decode
    torch.testing.assert_close(out.logits[0], full[86:89], rtol=0, atol=ATOL)


@pytest.mark.parametrize("prefill_kernel", ["onednn", "tiled"])
def test_lsa_chunk_straddling_index_topk_attends_its_dense_rows_expanded(prefill_kernel: str) -> None:
    """One 150-row chunk of an LSA model (index_topk 64): rows 0-63 see <= index_topk keys and attend in
    the expanded form (kv_b_proj runs: the sparse path never calls it), rows 64-149 over their top-k;
    every row's logits equal the model's."""
    model = _model("tiny")
    assert model.config.index_topk == 64
    ids = torch.randint(4, 512, (150,)).tolist()
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0]
    runner = ModelRunner(model, block_size=16)
    runner.attention.prefill_kernel = prefill_kernel
    seq = runner.new_sequence(ids)
    expanded = []
    mla = model.model.layers[0].self_attn[0]
    hook = mla.kv_b_proj.register_forward_hook(lambda m, a, out: expanded.append(a[0].shape[0]))
    out = runner.forward([Segment(seq, torch.tensor(ids), 0, "all")])
    hook.remove()
    assert sum(expanded) == 64  # the latents of the 64 dense rows' keys, expanded once
    torch.testing.assert_close(out.logits[0], full, rtol=0, atol=ATOL)


@pytest.mark.parametrize("short_kernel", ["runs", "gather"])
def test_short_dense_segments_in_place_or_gathered_equal_the_model(short_kernel: str) -> None:
    """Short dense segments of several sequences in one step (decode rows and multi-row chunks, blocks
    interleaved so the reads cross runs): the in-place kernel (CPU default) and the batched gather agree
    with the model."""
    model = _model("tiny-flash")
    seqs_ids = [torch.randint(4, 512, (n,)).tolist() for n in (40, 57, 36)]
    with torch.no_grad():
        full = [model(torch.tensor([ids]))[0] for ids in seqs_ids]
    runner = ModelRunner(model, block_size=8, short_kernel=short_kernel)
    assert runner.attention.short_kernel == short_kernel
    seqs = [runner.new_sequence(ids) for ids in seqs_ids]
    done = [0, 0, 0]
    for width in (5, 3, 7, 1, 2, 1, 1):  # each step: the next `width` tokens of every sequence
        _step_and_check(runner, seqs, seqs_ids, done, [width if n else 16 for n in done], full)  # (16 first)
    assert all(len(runner.cache.runs(s.blocks, 0, n)) > 1 for s, n in zip(seqs, done))
    with pytest.raises(ValueError, match="short_kernel"):
        ModelRunner(model, short_kernel="paged")


@pytest.mark.parametrize("compiled", [True, False])
def test_lsa_decode_rows_of_several_sequences_equal_the_model(
    monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """Decode steps over several sequences past index_topk (plus one still dense and one prefill chunk in
    the same step): their selections come from one batched scan and top-k (`index_scan_rows`: one C call,
    or without the C kernels a PyTorch scan per row into the shared buffer), and every row's logits equal
    the model's full forward."""
    from longcat2.engine import context, native

    with contextlib.nullcontext() if compiled else native.disabled():
        calls = []
        scan_rows = context.index_scan_rows
        monkeypatch.setattr(
            context, "index_scan_rows", lambda *a, **k: calls.append(a[0].shape[0]) or scan_rows(*a, **k)
        )
        model = _model("tiny")  # index_topk 64
        seqs_ids = [torch.randint(4, 512, (n,)).tolist() for n in (150, 90, 40, 120)]
        with torch.no_grad():
            full = [model(torch.tensor([ids]))[0] for ids in seqs_ids]
        runner = ModelRunner(model, block_size=16)
        prompts = (130, 70, 30, 100)
        seqs = [runner.new_sequence(ids) for ids in seqs_ids]
        for seq, ids, n in zip(seqs[:3], seqs_ids, prompts):
            _prefill(runner, seq, ids[:n], chunk=50)
        done = list(prompts[:3]) + [0]
        for _ in range(4):  # three decode rows (two past index_topk, one dense), the fourth's prefill chunk
            _step_and_check(runner, seqs, seqs_ids, done, [1, 1, 1, 25], full)
        assert calls and all(r == 2 for r in calls)  # the two long decode rows, batched, in every LSA layer


@pytest.mark.parametrize("prompt_len", [50, 140])
def test_mtp_cache_step_one_equals_training_mtp(prompt_len: int) -> None:
    model = _model("tiny")
    ids = torch.randint(4, 512, (prompt_len,)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids]), return_dict=True, with_mtp=True).mtp_logits[0][0]  # [P-1, V]
    runner = ModelRunner(model, block_size=16, with_mtp=True)
    seq = runner.new_sequence(ids)
    hidden = []
    for c0 in range(0, prompt_len, 45):
        out = runner.forward([Segment(seq, torch.tensor(ids[c0 : c0 + 45]), c0, "none")])
        hidden.append(out.hidden)
    hidden = torch.cat(hidden)
    got = []
    for c0 in range(0, prompt_len - 1, 33):  # MTP rows p combine hidden p with token p+1
        c1 = min(prompt_len - 1, c0 + 33)
        seg = Segment(seq, torch.tensor(ids[c0 + 1 : c1 + 1]), c0, "all")
        got.append(runner.mtp_forward([seg], hidden[c0:c1]).logits[0])
    torch.testing.assert_close(torch.cat(got), ref, rtol=0, atol=ATOL)


def test_bf16_two_pass_index_mode_selects_like_the_exact_scan() -> None:
    """bf16 model + bf16 index keys: the bf16 GEMM two-pass decode scan returns the fp32 scan's indices."""
    model = _model("tiny").to(torch.bfloat16)
    ids = torch.randint(4, 512, (200,)).tolist()
    sels = {}
    logits = {}
    for mode in ("exact", "bf16"):
        runner = ModelRunner(model, block_size=32, index_mode=mode)
        seq = runner.new_sequence(ids)
        _prefill(runner, seq, ids[:190], chunk=95)
        seen = []
        owners = [layer.self_attn[0] for layer in model.model.layers]
        hooks = [m.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out[1][0])) for m in owners]
        outs = []
        for i in range(190, 200):
            outs.append(runner.forward([Segment(seq, torch.tensor(ids[i : i + 1]), i, "last")]).logits[0][0])
        for hook in hooks:
            hook.remove()
        sels[mode], logits[mode] = seen, torch.stack(outs)
    assert all(torch.equal(a, b) for a, b in zip(sels["exact"], sels["bf16"]))
    assert torch.equal(logits["exact"], logits["bf16"])
    with torch.no_grad():
        full = model(torch.tensor([ids]))[0, 190:200].float()
    assert (logits["bf16"].float() - full).abs().max() < 0.1 * full.abs().max()  # bf16 rounding only


@pytest.mark.parametrize("matmul, expected", [("fp32", "exact"), ("native", "auto")])
def test_auto_index_mode_scans_in_fp32_where_bf16_matmuls_run_as_fp32(
    monkeypatch: pytest.MonkeyPatch, matmul: str, expected: str
) -> None:
    """Without a native bf16 GEMM the two-pass scan's bf16 pass is itself fp32 BLAS work: "auto" takes the
    exact scan there (an explicit "bf16" is kept)."""
    from longcat2.engine import cpu

    monkeypatch.setenv("LONGCAT2_BF16_MATMUL", matmul)
    cpu.bf16_matmul_via_fp32.cache_clear()
    try:
        model = _model("tiny").to(torch.bfloat16)
        assert ModelRunner(model, block_size=32).attention.index_mode == expected
        assert ModelRunner(model, block_size=32, index_mode="bf16").attention.index_mode == "bf16"
    finally:
        monkeypatch.undo()
        cpu.bf16_matmul_via_fp32.cache_clear()


def _calls_by_module(model: LongCatForCausalLM) -> tuple[dict[str, int], list]:
    """Forward-call counters for every module that owns parameters directly (Linear, norms, embeddings,
    the stacked experts)."""
    calls: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            calls[name] = 0
            hooks.append(
                mod.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
            )
    return calls, hooks


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_calls_every_model_module(speculative: bool) -> None:
    """The engine runs the model's own modules: with a 200-token prompt (48-token prefill chunks: the first
    within index_topk, expanded dense form; the rest LSA-sparse) and sparse decode, every parameterised
    module's forward runs (the MTP head's too when speculative)."""
    from longcat2.engine import Engine, SamplingParams

    model = _model("tiny")
    calls, hooks = _calls_by_module(model)
    prompt = torch.randint(4, 512, (200,)).tolist()
    eng = Engine(model, max_step_tokens=48, block_size=32, speculative=speculative)
    eng.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))
    for hook in hooks:
        hook.remove()
    expected = [n for n in calls if speculative or not n.startswith("model.mtp.")]
    assert len(expected) >= 71
    assert [n for n in expected if calls[n] == 0] == []


def test_sparse_decode_calls_every_module_but_the_expanded_kv_projection() -> None:
    """A decode step over a long context runs every main-model module; kv_b_proj enters only through its
    weight halves (`MLA.absorb` / `MLA.unabsorb`), as in the model's own sparse path."""
    model = _model("tiny")
    ids = torch.randint(4, 512, (150,)).tolist()
    runner = ModelRunner(model, block_size=32)
    seq = runner.new_sequence(ids)
    _prefill(runner, seq, ids[:149], chunk=149)
    calls, hooks = _calls_by_module(model)
    runner.forward([Segment(seq, torch.tensor(ids[149:]), 149, "last")])
    for hook in hooks:
        hook.remove()
    missing = [n for n, c in calls.items() if c == 0 and not n.startswith("model.mtp.")]
    assert missing and all(n.endswith("kv_b_proj") for n in missing)


@pytest.mark.parametrize("min_keys, two_pass", [(None, False), (0, True)])
def test_auto_index_mode_takes_the_two_pass_scan_on_cpu_only_for_long_rows(
    monkeypatch: pytest.MonkeyPatch, min_keys: int | None, two_pass: bool
) -> None:
    """ "auto" with a native bf16 GEMM: a CPU decode row scans exactly below BF16_SCAN_MIN_KEYS_CPU keys
    (the two-pass scan's rescoring costs more there) and in two passes from it on."""
    from longcat2.engine import context, cpu

    monkeypatch.setenv("LONGCAT2_BF16_MATMUL", "native")
    cpu.bf16_matmul_via_fp32.cache_clear()
    if min_keys is not None:
        monkeypatch.setattr(context, "BF16_SCAN_MIN_KEYS_CPU", min_keys)
    calls = []
    plain = context.index_scan_select_bf16
    monkeypatch.setattr(context, "index_scan_select_bf16", lambda *a, **k: calls.append(1) or plain(*a, **k))
    try:
        model = _model("tiny").to(torch.bfloat16)
        runner = ModelRunner(model, block_size=32)
        assert runner.attention.index_mode == "auto"
        ids = torch.randint(4, 512, (200,)).tolist()
        seq = runner.new_sequence(ids)
        _prefill(runner, seq, ids[:190], chunk=95)
        for i in range(190, 193):
            runner.forward([Segment(seq, torch.tensor(ids[i : i + 1]), i, "last")])
        assert bool(calls) is two_pass
    finally:
        monkeypatch.undo()
        cpu.bf16_matmul_via_fp32.cache_clear()


def test_prefill_two_pass_scan_gives_the_exact_scans_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 prefill rows through the certified two-pass scan (`index_scan_bf16_rows`; its floor lowered so
    the tiny model's rows take it) select what the exact fp32 scan selects: bit-equal logits."""
    from longcat2.engine import context, cpu, native

    if not native.available():
        pytest.skip("no compiled kernels here")
    monkeypatch.setenv("LONGCAT2_BF16_MATMUL", "native")
    cpu.bf16_matmul_via_fp32.cache_clear()
    monkeypatch.setattr(context, "BF16_PREFILL_SCAN_MIN_KEYS", 0)
    calls = []
    plain = context.index_scan_bf16_rows
    monkeypatch.setattr(context, "index_scan_bf16_rows", lambda *a, **k: calls.append(1) or plain(*a, **k))
    try:
        model = _model("tiny").to(torch.bfloat16)
        ids = torch.randint(4, 512, (300,)).tolist()
        logits = {}
        for mode in ("exact", "auto"):
            runner = ModelRunner(model, block_size=32, index_mode=mode)
            logits[mode] = _prefill(runner, runner.new_sequence(ids), ids, chunk=100)
            assert bool(calls) is (mode == "auto")
        assert torch.equal(logits["auto"], logits["exact"])
    finally:
        monkeypatch.undo()
        cpu.bf16_matmul_via_fp32.cache_clear()
