"""Selection quality of hierarchical indexing (HI) and FP8 index keys through the engine, on any model.

`--model`: a model folder, one training checkpoint, a training run folder (its latest checkpoint) or the
embedded model. Text: the repository's own Python sources, tokenised with the model's tokenizer and cut into
`--sequences` sequences of each of `--lengths` tokens. Each sequence is prefilled through `ModelRunner`
(chunks of `--chunk`); per indexer owner a forward hook captures the owner's input and the engine's
selection of every row.

HI (forced on from `--min-len` keys, pages of `--page` tokens with `--block`-token sub-block means, keeping
`--keep` of the sequence's pages or `--top-pages` pages) is compared with the exact LSA top-k that the
model's own rule (`lsa.index_scores` → `force_and_mask` → `select_topk`, the training path) computes from
the same input, over the rows where HI drops pages (position >= top_pages·page; earlier rows are fully
covered and exact by construction). Per owner layer and overall:
- overlap: |S_HI ∩ S_exact| / |S_exact|, the whole top-k set (forced sink + local tokens included), the
  issue's measure; `dyn`: the same over the content-selected part only (top-k - init - local tokens);
- tie-aware overlap: an HI token counts when it is forced or its exact score is >= τ, the exact kd-th
  best dynamic score, less a rounding tolerance (1e-5 of the row's largest |score|). The exact set breaks
  ties at τ by position (ReLU makes exact-zero plateaus common; a random or weak indexer makes near-ties),
  so raw overlap counts an equal-score swap as a miss; the tie-aware figure does not. `tie rows`: the share
  of rows with more dynamic keys at >= τ - tol than the kd slots; `τ=0`: rows whose boundary is the zero
  plateau;
- attention mass: the owner sublayer's dense attention probability (mean over heads) that S_HI captures,
  over the mass S_exact captures (total over rows, and per-row mean / 5th pct).
`--analyse` splits HI's misses (exact dynamic tokens HI dropped) into tokens of pages the coarse stage
dropped and tokens of kept pages (fine-stage rounding), and prints the page recall (exact dynamic tokens
lying in kept pages) of the coarse stage next to two references with the same page budget: pages ranked
by their best token's exact score (a perfect max summary) and by how many exact top-k tokens they hold (the
most any choice of pages can recall), the coarse rank of the dropped pages that held misses, and how far
above τ the missed tokens were.

FP8 (`--fp8`): the same sequences with bf16 index keys and with fp8 keys, HI off, in three arms: the
cache's default (Hadamard-rotated, per-token scale searched, see `cache.quantize_fp8`), unrotated, and
with the plain amax / 448 scale. The fp8 runs replay the bf16 run's owner inputs (a forward pre-hook), so
every layer's owner sees identical inputs and only the key storage differs. Overlap of the fp8 selection with the
bf16 one over the sparse rows (position >= top-k), raw and tie-aware against the bf16-key scores, plus the
score error fp8 keys make (max |s_fp8 - s_bf16| per row, relative to the row's largest |score|) and how many
dynamic keys sit within that error of τ (the keys whose side of the boundary quantisation can flip), and
the attention mass of the fp8 selection over the bf16 one's.

`--e2e`: next-token predictions through the engine with exact LSA, HI, fp8 keys and HI + fp8 over the rows
where HI drops pages: mean loss and top-1 agreement with exact (an end-to-end check for models that cannot
do a passkey; bench/hi_passkey.sh measures passkey accuracy for those that can).

    python bench/hi_quality.py --model runs/default-model-v2/pretrain --lengths 2048,4096 --keep 0.5 --fp8
    python bench/hi_quality.py --lengths 1024 --top-pages 24 --fp8 --analyse --e2e   # smoke (embedded model)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import load_average  # noqa: E402

from longcat2.engine.cache import FP8_SCALE_CANDIDATES, hadamard, quantize_fp8  # noqa: E402
from longcat2.engine.runner import ModelRunner, Segment  # noqa: E402
from longcat2.model.longcat import LongCatForCausalLM  # noqa: E402
from longcat2.model.lsa import force_and_mask, index_scores, select_topk  # noqa: E402
from longcat2.model_dir import resolve_model_dir  # noqa: E402
from longcat2.tokenizer import load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = 256  # query rows scored at a time
TIE_TOL = 1e-5  # tie-aware tolerance, relative to the row's largest |score|
# fp8 arms: name, Hadamard rotation, per-token scale candidates (the cache's default search; 1 = amax / 448)
FP8_ARMS = (("fp8", True, FP8_SCALE_CANDIDATES), ("fp8 unrotated", False, FP8_SCALE_CANDIDATES),
            ("fp8 amax scale", True, 1))  # fmt: skip


def sequences(tok, length: int, n: int) -> list[list[int]]:
    text = "\n".join(p.read_text() for p in sorted((ROOT / "longcat2").rglob("*.py")))
    ids = tok.encode(text)
    if len(ids) < length:
        raise SystemExit(f"--lengths {length}: the corpus has only {len(ids)} tokens")
    return [ids[i * length : (i + 1) * length] for i in range(n) if (i + 1) * length <= len(ids)]


def owners(model) -> dict[int, torch.nn.Module]:
    return {li: layer.self_attn[0] for li, layer in enumerate(model.model.layers)}


def run_engine(
    model,
    ids: list[int],
    chunk: int,
    replay: dict | None = None,
    scales: int = FP8_SCALE_CANDIDATES,
    logits: list | None = None,
    **kw,
) -> dict:
    """Prefill `ids` through ModelRunner → per owner layer: (its input x [T, H], its selection [T, k], the
    inputs of each call). replay: per owner the inputs of another run's calls, substituted in order;
    scales: the fp8 quantiser's per-token scale candidates (1 = amax / 448); logits: a list that receives
    every chunk's logits [rows, V]."""
    got: dict[int, tuple[list, list]] = {li: ([], []) for li in owners(model)}
    hooks = []
    for li, mla in owners(model).items():
        if replay is not None:
            calls = iter(replay[li])
            hooks.append(mla.register_forward_pre_hook(lambda m, a, calls=calls: (next(calls), *a[1:])))

        def hook(mod, args, out, li=li):
            got[li][0].append(args[0])
            got[li][1].append(torch.cat([s for s in out[1] if s is not None]) if out[1] is not None else None)

        hooks.append(mla.register_forward_hook(hook))
    runner = ModelRunner(model, block_size=256, num_blocks=-(-len(ids) // 256) + 1, **kw)
    runner.cache.fp8_scale_candidates = scales
    seq = runner.new_sequence(ids)
    try:
        with torch.inference_mode():
            for s in range(0, len(ids), chunk):
                step = runner.forward(
                    [
                        Segment(
                            seq, torch.tensor(ids[s : s + chunk]), s, "all" if logits is not None else "none"
                        )
                    ]
                )
                if logits is not None:
                    logits.append(step.logits[0].float())
    finally:
        for h in hooks:
            h.remove()
    out = {}
    k = model.config.index_topk
    for li, (xs, sels) in got.items():
        rows = [s if s is not None else torch.full((x.shape[1], k), -1) for s, x in zip(sels, xs)]
        out[li] = (torch.cat(xs, 1)[0], torch.cat(rows), xs)
    return out


class Owner:
    """The indexer and attention of one owner sublayer on a fixed input x [T, H] (fp32)."""

    def __init__(self, model, li: int, x: torch.Tensor) -> None:
        self.cfg = model.config
        self.mla = owners(model)[li]
        t = x.shape[0]
        self.pos = torch.arange(t)
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(self.pos, x.dtype)
            xb = x[None]
            self.p = self.mla.project(xb, cos, sin)
            self.keys = self.mla.indexer.keys(xb, cos, sin)[0].float()  # [T, d]
            q, w = self.mla.indexer.queries(xb, self.p.q_lora, cos, sin)
            self.q, self.w = q[0].float(), w[0]  # [T, h, d], [T, h]
            k, _ = self.mla.expand(self.p.kv_latent, self.p.k_rope)
            self.k_t = k[0].permute(1, 2, 0)  # [h, qk, T]

    def scores(self, r0: int, r1: int, keys: torch.Tensor | None = None, q=None) -> torch.Tensor:
        """Exact index scores [R, T] of rows r0..r1 (keys / queries: a variant, e.g. quantised)."""
        q = self.q[r0:r1] if q is None else q[r0:r1]
        return index_scores(q[None], self.w[None, r0:r1], (self.keys if keys is None else keys)[None])[0]

    def attention(self, r0: int, r1: int) -> torch.Tensor:
        """Dense causal attention probabilities [R, T] of rows r0..r1, mean over heads."""
        with torch.no_grad():
            q = torch.cat([self.p.q_nope, self.p.q_rope], -1)[0, r0:r1].transpose(0, 1)  # [h, R, qk]
            sc = (q @ self.k_t).float() * self.mla.softmax_scale  # [h, R, T]
            sc.masked_fill_(self.pos[None, r0:r1, None] < self.pos[None, None, :], float("-inf"))
            return sc.softmax(-1).mean(0)


def dynamic(cfg, sc: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """scores [R, T] → the same with every non-dynamic key (sink, local, future) at -inf."""
    s = torch.arange(sc.shape[1])[None]
    dyn = (s >= cfg.index_init_tokens) & (s <= qpos[:, None] - cfg.index_local_tokens)
    return sc.masked_fill(~dyn, float("-inf"))


def compare(cfg, sc: torch.Tensor, qpos: torch.Tensor, ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Per row (rows at qpos [R] with more dynamic keys than kd): the raw, dynamic-part and tie-aware
    overlap of `got` [R, k] with `ref` [R, k] (-1 = empty) under scores sc [R, T]."""
    t = sc.shape[1]
    kd = cfg.index_topk - cfg.index_init_tokens - cfg.index_local_tokens
    dyn = dynamic(cfg, sc, qpos)
    tau = dyn.topk(kd, dim=-1).values[:, -1]  # [R] the kd-th best dynamic score
    tol = TIE_TOL * sc.masked_fill(sc.isinf(), 0).abs().amax(-1)
    in_ref = torch.zeros(sc.shape[0], t + 1, dtype=torch.bool)
    in_ref.scatter_(1, ref.masked_fill(ref < 0, t), True)
    in_ref[:, t] = False
    valid = got >= 0
    hits = (in_ref.gather(1, got.masked_fill(~valid, t)) & valid).sum(1)
    n_ref = (ref >= 0).sum(1).clamp(min=1)
    forced = valid & ((got < cfg.index_init_tokens) | (got > (qpos - cfg.index_local_tokens)[:, None]))
    s_got = sc.gather(1, got.clamp(min=0))
    good = (forced | (valid & (s_got >= (tau - tol)[:, None]))).sum(1)
    n_forced = n_ref - kd
    return {
        "overlap": hits / n_ref,
        "dyn": (hits - n_forced) / kd,
        "tie": good.clamp(max=n_ref) / n_ref,
        "tie_rows": ((dyn >= (tau - tol)[:, None]).sum(1) > kd).float(),
        "tau0": (tau == 0).float(),
        "tau": tau,
        "tol": tol,
    }


def later_first(scores: torch.Tensor) -> torch.Tensor:
    """Indices of scores [N] best first, equal scores the later index first (the engine's page tie rule)."""
    return scores.numel() - 1 - torch.argsort(scores.flip(0), descending=True, stable=True)


def kept_mask(n_pages: int, cand: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Pages [n_pages] a row keeps: every non-candidate page (forced) and the `keep` best candidates."""
    kept = torch.ones(n_pages, dtype=torch.bool)
    kept[cand] = False
    kept[cand[later_first(scores)[:keep]]] = True
    return kept


def analyse_hi(cfg, o: Owner, sc: torch.Tensor, qpos: torch.Tensor, exact, sel, tau) -> dict:
    """Coarse-stage diagnosis of rows qpos: page recall of the coarse stage (from fp32 sub-block means, as
    the cache keeps them for fp32 keys), of pages ranked by their best token score ("max") and of pages
    ranked by their count of exact top-k tokens ("best"), and where HI's misses lie."""
    page, b = cfg.lsa_hi_page_size, cfg.lsa_hi_block_size
    init, local = cfg.index_init_tokens, cfg.index_local_tokens
    t, d = o.keys.shape
    n_sub = t // b
    means = o.keys[: n_sub * b].view(n_sub, b, d).mean(1)  # [sub-blocks, d]
    r0 = int(qpos[0])
    sub = o.scores(r0, r0 + len(qpos), keys=means)  # [R, sub-blocks]
    n_pages = n_sub // (page // b)
    coarse = sub[:, : n_pages * (page // b)].view(len(qpos), n_pages, -1).amax(-1)  # [R, pages]
    best_tok = sc[:, : n_pages * page].view(len(qpos), n_pages, page).amax(-1)  # [R, pages]
    p0 = -(-init // page)
    out: dict[str, list] = {k: [] for k in ("recall", "max", "best", "miss_dropped", "miss_kept", "miss_rank",
                                            "miss_margin")}  # fmt: skip
    for i, qp in enumerate(qpos.tolist()):
        nc = max(0, (qp - local + 1) // page - p0)
        keep = cfg.lsa_hi_top_pages - (qp // page + 1 - nc)
        cand = torch.arange(p0, p0 + nc)
        ex = exact[i][(exact[i] >= init) & (exact[i] <= qp - local)]  # exact dynamic tokens
        held = torch.bincount(ex // page, minlength=n_pages + 1).float()  # exact tokens per page
        order = later_first(coarse[i, cand])
        kept = kept_mask(qp // page + 1, cand, coarse[i, cand], keep)
        out["recall"].append(float(kept[ex // page].float().mean()))
        for name, ranking in (("max", best_tok[i, cand]), ("best", held[cand])):
            out[name].append(float(kept_mask(qp // page + 1, cand, ranking, keep)[ex // page].float().mean()))
        missed = ex[~torch.isin(ex, sel[i])]
        if missed.numel():
            in_dropped = ~kept[missed // page]
            out["miss_dropped"].append(int(in_dropped.sum()))
            out["miss_kept"].append(int((~in_dropped).sum()))
            rank = torch.empty(n_pages + 1, dtype=torch.long)
            rank[cand[order]] = torch.arange(1, nc + 1)
            out["miss_rank"].extend((rank[missed[in_dropped] // page].float() / keep).tolist())
            top = float(sc[i, ex].max())
            span = max(top - float(tau[i]), 1e-12)
            out["miss_margin"].extend(((sc[i, missed] - tau[i]) / span).tolist())
    return out


def mass(prob: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Attention probability [R] that the selections sel [R, k] (-1 = empty) capture under prob [R, T]."""
    return prob.gather(1, sel.clamp(min=0)).masked_fill(sel < 0, 0).sum(1)


def stat(x) -> str:
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.numel() == 0:
        return "n/a"
    return f"{float(x.mean()):.4f} (p5 {float(x.quantile(0.05)):.4f})"


def cat(parts: list, key: str) -> torch.Tensor:
    return torch.cat([p[key] for p in parts]) if parts else torch.empty(0)


def hi_arm(model, base, hi_cfg, ids, args, totals: dict) -> None:
    model.config = hi_cfg
    try:
        got = run_engine(model, ids, args.chunk)
    finally:
        model.config = base
    first = max(base.index_topk, hi_cfg.lsa_hi_top_pages * hi_cfg.lsa_hi_page_size, hi_cfg.lsa_hi_min_len)
    for li, (x, sel_hi, _) in got.items():
        o = Owner(model, li, x)
        parts, mass_hi, mass_ex, diag = [], [], [], {}
        for r0 in range(first, x.shape[0], ROWS):
            r1 = min(x.shape[0], r0 + ROWS)
            qpos = o.pos[r0:r1]
            sc = o.scores(r0, r1)
            exact = select_topk(force_and_mask(sc[None], qpos, base.index_init_tokens,
                                               base.index_local_tokens), base.index_topk)[0]  # fmt: skip
            c = compare(base, sc, qpos, exact, sel_hi[r0:r1])
            parts.append(c)
            prob = o.attention(r0, r1)
            mass_ex.append(mass(prob, exact))
            mass_hi.append(mass(prob, sel_hi[r0:r1]))
            if args.analyse:
                for k, v in analyse_hi(hi_cfg, o, sc, qpos, exact, sel_hi[r0:r1], c["tau"]).items():
                    diag.setdefault(k, []).extend(v)
        if not parts:
            print(f"  layer {li}: no row drops pages at this length")
            continue
        m_ex, m_hi = torch.cat(mass_ex), torch.cat(mass_hi)
        row = {k: cat(parts, k) for k in ("overlap", "dyn", "tie", "tie_rows", "tau0")}
        row["mass"] = m_hi / m_ex
        tot = totals.setdefault(li, {"rows": [], "m": [0.0, 0.0]})
        tot["rows"].append(row)
        tot["m"][0] += float(m_hi.sum())
        tot["m"][1] += float(m_ex.sum())
        print(f"  layer {li} ({len(m_ex)} rows): overlap {stat(row['overlap'])}, dyn {stat(row['dyn'])}, "
              f"tie-aware {stat(row['tie'])}; tie rows {float(row['tie_rows'].mean()):.3f}, "
              f"τ=0 {float(row['tau0'].mean()):.3f}; mass HI/exact total {float(m_hi.sum() / m_ex.sum()):.4f}, "
              f"per row {stat(row['mass'])}; exact top-k holds {float(m_ex.mean()):.3f} of the dense mass",
              flush=True)  # fmt: skip
        if args.analyse and diag.get("recall"):
            n_drop, n_kept = sum(diag["miss_dropped"]), sum(diag["miss_kept"])
            ranks = torch.tensor(diag["miss_rank"] or [0.0])
            marg = torch.tensor(diag["miss_margin"] or [0.0])
            print(f"    coarse stage: page recall {stat(diag['recall'])} (pages by best token "
                  f"{stat(diag['max'])}, best possible {stat(diag['best'])}); misses {n_drop} in dropped pages, {n_kept} in kept pages; "
                  f"dropped pages' coarse rank / kept: median {float(ranks.median()):.2f}, "
                  f"<= 1.5x {float((ranks <= 1.5).float().mean()):.2f}; missed tokens' score above τ / "
                  f"(row's best - τ): median {float(marg.median()):.3f}, <= 0.1 {float((marg <= 0.1).float().mean()):.2f}",
                  flush=True)  # fmt: skip


def fp8_arms(model, ids, args, totals: dict) -> None:
    cfg = model.config
    ref = run_engine(model, ids, args.chunk, index_dtype="bf16")
    replay = {li: v[2] for li, v in ref.items()}
    for name, rotate, scales in FP8_ARMS:
        got = run_engine(
            model, ids, args.chunk, replay=replay, scales=scales, index_dtype="fp8", index_rotate=rotate
        )
        for li, (x, sel_bf16, _) in ref.items():
            o = Owner(model, li, x)
            k16 = o.keys.bfloat16().float()
            rot = hadamard(o.keys.shape[1]) if rotate else None
            kq = o.keys @ rot if rotate else o.keys
            v8, s8 = quantize_fp8(kq, scales)
            k8 = v8.float() * s8
            q8 = o.q @ rot if rotate else o.q
            parts = []
            for r0 in range(cfg.index_topk, x.shape[0], ROWS):
                r1 = min(x.shape[0], r0 + ROWS)
                qpos = o.pos[r0:r1]
                sc16 = o.scores(r0, r1, keys=k16)
                c = compare(cfg, sc16, qpos, sel_bf16[r0:r1], got[li][1][r0:r1])
                err = (o.scores(r0, r1, keys=k8, q=q8) - sc16).abs()  # [R, T]
                err = err.masked_fill(o.pos[None, :] > qpos[:, None], 0).amax(-1)
                scale = (c["tol"] / TIE_TOL).clamp(min=1e-30)
                dyn = dynamic(cfg, sc16, qpos)
                c["err"] = err / scale
                c["near"] = ((dyn - c["tau"][:, None]).abs() <= err[:, None]).sum(1).float()
                prob = o.attention(r0, r1)
                c["mass"] = mass(prob, got[li][1][r0:r1]) / mass(prob, sel_bf16[r0:r1])
                parts.append(c)
            row = {k: cat(parts, k) for k in ("overlap", "dyn", "tie", "tie_rows", "err", "near", "mass")}
            totals.setdefault((name, li), []).append(row)
            print(f"  layer {li}, {name} vs bf16 keys: overlap {stat(row['overlap'])}, dyn {stat(row['dyn'])}, "
                  f"tie-aware {stat(row['tie'])}; score error / row max {stat(row['err'])}; dynamic keys within "
                  f"that error of τ: mean {float(row['near'].mean()):.1f}; attention mass fp8 / bf16 "
                  f"{stat(row['mass'])}", flush=True)  # fmt: skip


def e2e_arms(model, base, hi_cfg, ids: list[int], args, totals: dict) -> None:
    """Next-token predictions through the engine on the same text, over the rows where HI drops pages:
    mean loss and top-1 agreement with exact LSA, for exact, HI, fp8 keys and HI + fp8."""
    first = max(base.index_topk, hi_cfg.lsa_hi_top_pages * hi_cfg.lsa_hi_page_size, hi_cfg.lsa_hi_min_len)
    target = torch.tensor(ids[first + 1 :])
    ref = None
    for name, cfg, kw in (("exact", base, {}), ("hi", hi_cfg, {}), ("fp8", base, {"index_dtype": "fp8"}),
                          ("hi+fp8", hi_cfg, {"index_dtype": "fp8"})):  # fmt: skip
        model.config = cfg
        chunks: list[torch.Tensor] = []
        try:
            run_engine(model, ids, args.chunk, logits=chunks, **kw)
        finally:
            model.config = base
        lg = torch.cat(chunks)[first:-1]  # [N, V] predicting ids[first + 1:]
        top1 = lg.argmax(-1)
        ref = top1 if ref is None else ref
        nll = torch.nn.functional.cross_entropy(lg, target, reduction="none")
        totals.setdefault(name, []).append((nll, (top1 == ref).float()))
        print(f"  {name}: next-token loss {float(nll.mean()):.4f}, top-1 agreement with exact "
              f"{float((top1 == ref).float().mean()):.4f} ({len(target)} rows)", flush=True)  # fmt: skip


def summary(label: str, rows: list[dict], keys: tuple[str, ...]) -> str:
    return f"{label}: " + ", ".join(f"{k} {stat(torch.cat([r[k] for r in rows]))}" for k in keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default=None, help="model folder / checkpoint / run folder (default: embedded)"
    )
    ap.add_argument("--lengths", default="4096", help="comma-separated sequence lengths")
    ap.add_argument("--sequences", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--block", type=int, default=4)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--keep", type=float, default=0.5, help="kept share of the sequence's pages (default 0.5)")
    g.add_argument("--top-pages", type=int, default=0, help="kept pages (instead of --keep)")
    ap.add_argument("--min-len", type=int, default=0, help="HI from this many keys (default: top-k)")
    ap.add_argument("--fp8", action="store_true", help="also compare fp8 and bf16 index keys")
    ap.add_argument("--no-hi", action="store_true", help="skip the HI comparison (fp8 only)")
    ap.add_argument("--analyse", action="store_true", help="diagnose HI's misses (coarse stage, margins)")
    ap.add_argument("--e2e", action="store_true", help="next-token loss / top-1 of exact, HI, fp8, HI + fp8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_dir(args.model)
    model = LongCatForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = load_tokenizer(path)
    base = model.config
    topk = base.index_topk
    print(f"# {' '.join(sys.argv)}")
    print(f"# {load_average()} at start; model {path}: top-k {topk} ({base.index_init_tokens} sink + "
          f"{base.index_local_tokens} local), indexer {base.index_n_heads} x {base.index_head_dim}, "
          f"{base.max_position_embeddings} positions")  # fmt: skip
    hi_tot: dict = {}
    fp8_tot: dict = {}
    e2e_tot: dict = {}
    for length in [int(v) for v in args.lengths.split(",") if v.strip()]:
        top_pages = args.top_pages or max(1, round(args.keep * length / args.page))
        hi_cfg = base.replace(lsa_hi=True, lsa_hi_page_size=args.page, lsa_hi_block_size=args.block,
                              lsa_hi_top_pages=top_pages, lsa_hi_min_len=args.min_len or topk).validate()  # fmt: skip
        note = " (beyond the model's positions)" if length > base.max_position_embeddings else ""
        print(f"\n## {length} tokens{note}: HI pages of {args.page}, sub-blocks of {args.block}, {top_pages} "
              f"pages kept ({top_pages * args.page} tokens, {top_pages * args.page / length:.0%}) from "
              f"{hi_cfg.lsa_hi_min_len} keys", flush=True)  # fmt: skip
        for ids in sequences(tok, length, args.sequences):
            if not args.no_hi:
                hi_arm(model, base, hi_cfg, ids, args, hi_tot.setdefault(length, {}))
            if args.fp8:
                fp8_arms(model, ids, args, fp8_tot.setdefault(length, {}))
            if args.e2e:
                e2e_arms(model, base, hi_cfg, ids, args, e2e_tot.setdefault(length, {}))
    print()
    for length, per_layer in hi_tot.items():
        rows = [r for t in per_layer.values() for r in t["rows"]]
        m = [sum(t["m"][i] for t in per_layer.values()) for i in (0, 1)]
        print(summary(f"HI vs exact top-k, {length} tokens, all layers", rows,
                      ("overlap", "dyn", "tie", "mass")) + f"; total mass HI / exact {m[0] / m[1]:.4f}")  # fmt: skip
    for length, per in fp8_tot.items():
        for name, _, _ in FP8_ARMS:
            rows = [r for (n, _), rs in per.items() if n == name for r in rs]
            label = f"{name} vs bf16 keys, {length} tokens, all layers"
            print(summary(label, rows, ("overlap", "dyn", "tie", "mass")))
    for length, per_arm in e2e_tot.items():
        print(f"next-token predictions, {length} tokens: " + "; ".join(
            f"{name} loss {float(torch.cat([n for n, _ in v]).mean()):.4f} top-1 = exact "
            f"{float(torch.cat([a for _, a in v]).mean()):.4f}" for name, v in per_arm.items()))  # fmt: skip
    print(f"# {load_average()} at the end")


if __name__ == "__main__":
    main()
