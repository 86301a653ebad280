"""MTP speculative decoding: draft up to 3 tokens with the model's MTP head, verify them in one pass.

Scheme (EAGLE-style, one MTP cache):
- The MTP cache holds, for every position p whose next token is known, the latent of the MTP block applied
  to (main hidden h_p, embedding of token p+1) at RoPE position p — exactly training-time MTP step 1. It is
  filled for the prompt during prefill (chunk by chunk, lagging one position) and caught up every round.
- A round for a sequence whose main cache holds positions 0..N-1 and whose last token x_N is not yet
  processed: (1) MTP over the pending positions mtp_len..N-1 (their main hiddens and next tokens) writes the
  exact entries and, from its last row, drafts d1; (2) draft steps 2..K feed the previous MTP output with
  the previous draft at the next position (approximate entries, overwritten next round); (3) the main model
  verifies [x_N, d1..dK] at positions N..N+K in one extend pass; (4) the longest prefix of drafts the
  target agrees with is accepted plus one bonus token from the target; the main cache rolls back to the
  kept positions and their hiddens become the next round's pending rows.
- LSA: draft step 1 runs the MTP block's own indexer; steps 2..K reuse that one index set (plus the newly
  drafted positions) — "all MTP draft steps share a single pass" (`dsa_mtp_cli`).
- Greedy: accept while draft == argmax of the target, so the output is token-for-token the output of plain
  greedy decoding. Sampling: standard speculative rejection sampling against the processed distributions
  (penalties included), so the output distribution is the target's.
"""

from __future__ import annotations

import torch

from longcat2.engine.runner import ModelRunner, Segment
from longcat2.engine.scheduler import Request


class SpeculativeDecoder:
    def __init__(self, runner: ModelRunner, num_draft: int) -> None:
        mtp = runner.model.model.mtp
        if mtp is None or not runner.with_mtp:
            raise ValueError("speculative decoding needs a model with an MTP head (mtp_num_layers > 0)")
        if not 1 <= num_draft <= 3:
            raise ValueError(f"num_draft: 1..3 draft tokens, got {num_draft}")
        if len(mtp.layers) > 1:  # separate modules per step: only module 0's cache is filled
            num_draft = 1
        self.runner = runner
        self.num_draft = num_draft
        self.rounds = 0
        self.proposed = 0
        self.accepted = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    # ------------------------------------------------------------------ prefill
    def after_prefill(self, chunks: list[tuple[Request, int, int, torch.Tensor]]) -> None:
        """chunks: (request, start, n, main hidden rows [n, H]) of this step's prompt chunks. Writes MTP
        entries for the positions whose next token is in the prompt; keeps the last prompt position pending."""
        segs, hid = [], []
        for req, start, n, rows in chunks:
            seq = req.seq
            assert seq is not None
            ids = req.prefill_ids
            last = len(ids) - 1
            m = max(0, min(start + n, last) - start)
            if m:
                segs.append(Segment(seq, torch.tensor(ids[start + 1 : start + 1 + m]), start, "none"))
                hid.append(rows[:m])
            seq.mtp_len = start + m
            if start + n == len(ids):
                req.pending_hidden = rows[n - 1 :]
        if segs:
            self.runner.mtp_forward(segs, torch.cat(hid))

    def _draft(self, req: Request, logits: torch.Tensor, step: int) -> tuple[int, torch.Tensor]:
        """Draft token `step` (1-based) from the MTP logits [V] → (token, draft distribution [V])."""
        q = req.sampler.probs(logits)
        return req.sampler.sample_from(q), q

    # ------------------------------------------------------------------ decode round
    def round(self, reqs: list[Request]) -> list[list[int]]:
        """One draft + verify round for every request. → tokens to append per request."""
        runner = self.runner
        k = self.num_draft
        seqs = [r.seq for r in reqs]
        ns = [len(s.tokens) - 1 for s in seqs]  # position of each sequence's unprocessed last token
        snaps = [r.sampler.snapshot() for r in reqs]

        # step 1: catch up the pending positions, draft d1 from the last row
        segs = [
            Segment(s, torch.tensor(s.tokens[s.mtp_len + 1 : n + 1]), s.mtp_len, "last")
            for s, n in zip(seqs, ns)
        ]
        out = runner.mtp_forward(segs, torch.cat([r.pending_hidden for r in reqs]))
        for s, n in zip(seqs, ns):
            s.mtp_len = n
        drafts: list[list[int]] = [[] for _ in reqs]
        qs: list[list[torch.Tensor]] = [[] for _ in reqs]
        last_rows = [off + len(seg.tokens) - 1 for seg, off in zip(segs, out.offsets)]
        shared_base = [None if sel is None else sel[-1] for sel in (out.selection or [None] * len(reqs))]
        hidden_prev = out.hidden  # replaced by each step's last rows below
        for step in range(1, k + 1):
            if step > 1:
                segs = [
                    Segment(s, torch.tensor([d[-1]]), n + step - 2, "last")
                    for s, n, d in zip(seqs, ns, drafts)
                ]
                shared = [
                    None
                    if base is None
                    else torch.cat([base, torch.arange(n, n + step - 1, device=base.device)])[None]
                    for base, n in zip(shared_base, ns)
                ]
                out = runner.mtp_forward(segs, hidden_prev, shared=shared)
                last_rows = out.offsets
            for i, r in enumerate(reqs):
                d, q = self._draft(r, out.logits[i][0], step)
                r.sampler.observe(d)
                drafts[i].append(d)
                qs[i].append(q)
            hidden_prev = out.hidden[torch.tensor(last_rows, device=out.hidden.device)]

        # verify [x_N, d1..dK] with the main model
        for r, snap in zip(reqs, snaps):
            r.sampler.restore(snap)
        segs = [Segment(s, torch.tensor([s.tokens[n]] + d), n, "all") for s, n, d in zip(seqs, ns, drafts)]
        out = runner.forward(segs)
        result = []
        for i, r in enumerate(reqs):
            rows = out.logits[i]  # [K+1, V]
            accepted: list[int] = []
            bonus = None
            for j in range(k):
                p = r.sampler.probs(rows[j])
                if r.sampler.accept_draft(p, qs[i][j], drafts[i][j]):
                    accepted.append(drafts[i][j])
                    r.sampler.observe(drafts[i][j])
                else:
                    bonus = r.sampler.sample_from(r.sampler.residual(p, qs[i][j]))
                    break
            if bonus is None:
                bonus = r.sampler.sample(rows[k])
            r.sampler.restore(snaps[i])
            n = ns[i]
            runner.truncate(seqs[i], n + len(accepted) + 1)
            off = out.offsets[i]
            r.pending_hidden = out.hidden[off : off + len(accepted) + 1]
            r.drafts_proposed += k
            r.drafts_accepted += len(accepted)
            self.proposed += k
            self.accepted += len(accepted)
            result.append(accepted + [bonus])
        self.rounds += 1
        return result
