"""Selection quality of hierarchical indexing (HI) and FP8 index keys on a trained model, through the engine.

Model: the embedded `longcat-2.0-tiny` default model (trained; LSA indexer 4 heads x 16, top-k 64 with 4 sink
+ 16 local; 4,096 positions with YaRN x4). Text: the repository's own Python sources, tokenised and cut into
sequences of `--length` tokens. Each sequence is prefilled through `ModelRunner` (chunks of `--chunk`) with
HI forced on from `--min-len` keys; per indexer owner the engine's HI selection of every row is captured
(a forward hook on the owner MLA) together with the owner's input, and compared with the exact LSA top-k
that the model's own selection (`MLA.select`, no cache) computes from the same input:

- set overlap: |S_HI ∩ S_exact| / |S_exact| per row, over the rows where HI actually drops pages (position
  >= top_pages · page; earlier rows are fully covered and exact by construction), mean and 5th pct;
- attention mass: the owner sublayer's dense attention probability (mean over heads) that S_HI captures,
  over the mass S_exact captures, per row (mean and 5th pct), and summed over all rows (total HI / exact).

HI settings are scaled to the model: LongCat-2.0 keeps 1024 pages x 128 = 64 x top-k tokens out of 1M;
here `--page`, `--block`, `--top-pages` (default 16-token pages, 4-token sub-blocks, 16 pages = 256 tokens =
4 x top-k out of 2K-4K, so HI has to find the right 6-12 % of the context).
FP8 (`--fp8`): the same sequences with fp8 (Hadamard-rotated) and bf16 index keys (HI off): overlap of
the two selections on each owner.

    .venv/bin/python bench/hi_quality.py --length 4096 --sequences 2
    .venv/bin/python bench/hi_quality.py --length 1024 --sequences 1 --fp8   # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average  # noqa: E402

from longcat2.engine.runner import ModelRunner, Segment  # noqa: E402
from longcat2.model.longcat import LongCatForCausalLM  # noqa: E402
from longcat2.model_dir import resolve_model_dir  # noqa: E402
from longcat2.tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def sequences(tok, length: int, n: int) -> list[list[int]]:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "longcat2").rglob("*.py")))
    ids = tok.encode(text)
    return [ids[i * length : (i + 1) * length] for i in range(n) if (i + 1) * length <= len(ids)]


def run_engine(model, ids: list[int], chunk: int, **kw) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Prefill `ids` through ModelRunner → per owner layer: (its input x [T, H], its selection [T, k])."""
    owners = {li: layer.self_attn[0] for li, layer in enumerate(model.model.layers)}
    got: dict[int, tuple[list, list]] = {li: ([], []) for li in owners}
    hooks = []
    for li, mla in owners.items():

        def hook(mod, args, out, li=li):
            got[li][0].append(args[0][0])
            got[li][1].append(torch.cat([s for s in out[1] if s is not None]) if out[1] is not None else None)

        hooks.append(mla.register_forward_hook(hook))
    runner = ModelRunner(model, block_size=256, num_blocks=-(-len(ids) // 256) + 1, **kw)
    seq = runner.new_sequence(ids)
    with torch.inference_mode():
        for s in range(0, len(ids), chunk):
            runner.forward([Segment(seq, torch.tensor(ids[s : s + chunk]), s, "none")])
    for h in hooks:
        h.remove()
    out = {}
    for li, (xs, sels) in got.items():
        x = torch.cat(xs)
        rows = [
            s if s is not None else torch.full((len(xi), model.config.index_topk), -1)
            for s, xi in zip(sels, xs)
        ]
        out[li] = (x, torch.cat(rows))
    return out


def exact_and_mass(model, li: int, x: torch.Tensor, sets: list[torch.Tensor]):
    """The model's exact LSA selection for the owner of layer li on input x [T, H], and the dense attention
    mass (mean over heads) of each selection in `sets` (each [T, k], -1 = empty) → (exact [T, k], masses)."""
    mla = model.model.layers[li].self_attn[0]
    t = x.shape[0]
    pos = torch.arange(t)
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(pos, x.dtype)
        xb = x[None]
        p = mla.project(xb, cos, sin)
        exact = mla.select(xb, p, cos, sin, pos)[0]  # [T, k]
        k, v = mla.expand(p.kv_latent, p.k_rope)
        q = torch.cat([p.q_nope, p.q_rope], -1)[0].transpose(0, 1)  # [h, T, qk]
        kh = k[0].transpose(0, 1)  # [h, T, qk]
        masses = [torch.zeros(t) for _ in range(len(sets) + 1)]
        for r0 in range(0, t, 256):
            r1 = min(t, r0 + 256)
            sc = (q[:, r0:r1] @ kh.transpose(1, 2)).float() * mla.softmax_scale  # [h, R, T]
            sc.masked_fill_(pos[None, r0:r1, None] < pos[None, None, :], float("-inf"))
            prob = sc.softmax(-1).mean(0)  # [R, T]
            for m, s in zip(masses, [exact, *sets]):
                sel = s[r0:r1]
                masses_r = torch.gather(prob, 1, sel.clamp(min=0)).masked_fill(sel < 0, 0).sum(1)
                m[r0:r1] = masses_r
    return exact, masses


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row |a ∩ b| / |b| (-1 = empty)."""
    out = torch.empty(a.shape[0])
    for i in range(a.shape[0]):
        sa, sb = set(a[i].tolist()) - {-1}, set(b[i].tolist()) - {-1}
        out[i] = len(sa & sb) / max(1, len(sb))
    return out


def seqs_fp8(model, ids: list[int], args, topk: int, fp8_ov: list) -> None:
    """fp8 vs bf16 index keys on one sequence (HI off); layer 0's owner sees identical inputs in both runs."""
    rot = {"index_rotate": False} if args.no_rotate else {}
    sel = {"bf16": run_engine(model, ids, args.chunk, index_dtype="bf16"),
           "fp8": run_engine(model, ids, args.chunk, index_dtype="fp8", **rot)}  # fmt: skip
    for li in sel["bf16"]:
        fp8_ov.append(overlap(sel["fp8"][li][1][topk:], sel["bf16"][li][1][topk:]))
        print(f"  layer {li}: fp8 vs bf16 index keys overlap {stat(fp8_ov[-1])}", flush=True)


def stat(x: torch.Tensor) -> str:
    return f"{float(x.mean()):.4f} (p5 {float(x.quantile(0.05)):.4f}, min {float(x.min()):.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="longcat-2.0-tiny")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--top-pages", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=0, help="HI from this many keys (default: top-k)")
    ap.add_argument("--fp8", action="store_true", help="also compare fp8 and bf16 index keys")
    ap.add_argument("--no-rotate", action="store_true", help="fp8 keys without the Hadamard rotation")
    ap.add_argument("--no-hi", action="store_true", help="skip the HI comparison (fp8 only)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_dir(args.model)
    model = LongCatForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = load_tokenizer(path)
    base = model.config
    topk = base.index_topk
    hi_cfg = base.replace(lsa_hi=True, lsa_hi_page_size=args.page, lsa_hi_block_size=args.block,
                          lsa_hi_top_pages=args.top_pages, lsa_hi_min_len=args.min_len or topk)  # fmt: skip
    print(f"# {' '.join(sys.argv)}")
    print(f"# {load_average()} at start; model {args.model}: top-k {topk} ({base.index_init_tokens} sink + "
          f"{base.index_local_tokens} local), HI pages of {args.page}, sub-blocks of {args.block}, {args.top_pages} "
          f"pages kept ({args.top_pages * args.page} tokens) from {hi_cfg.lsa_hi_min_len} keys")  # fmt: skip
    seqs = sequences(tok, args.length, args.sequences)
    ov, mass, fp8_ov, tot = [], [], [], [0.0, 0.0]
    for ids in seqs:
        if args.no_hi:
            seqs_fp8(model, ids, args, topk, fp8_ov)
            continue
        model.config = hi_cfg
        got = run_engine(model, ids, args.chunk)
        model.config = base
        for li, (x, sel_hi) in got.items():
            exact, (m_exact, m_hi) = exact_and_mass(model, li, x, [sel_hi])
            rows = slice(max(topk, args.top_pages * args.page), None)  # rows whose kept pages miss some pages
            ov.append(overlap(sel_hi[rows], exact[rows]))
            mass.append(m_hi[rows] / m_exact[rows])
            tot[0] += float(m_hi[rows].sum())
            tot[1] += float(m_exact[rows].sum())
            print(f"  layer {li}: overlap {stat(ov[-1])}; attention mass HI / exact {stat(mass[-1])}; "
                  f"exact top-k captures {float(m_exact[rows].mean()):.3f} of the dense mass", flush=True)  # fmt: skip
        if args.fp8:
            seqs_fp8(model, ids, args, topk, fp8_ov)
    if ov:
        print(f"\nHI vs exact LSA top-k over {len(seqs)} x {args.length} tokens: set overlap {stat(torch.cat(ov))}, "
          f"attention mass per row {stat(torch.cat(mass))}; total mass HI / exact {tot[0] / tot[1]:.4f}")  # fmt: skip
    if fp8_ov:
        print(f"fp8 vs bf16 index keys: set overlap {stat(torch.cat(fp8_ov))}")
    print(f"# {load_average()} at the end")


if __name__ == "__main__":
    main()
