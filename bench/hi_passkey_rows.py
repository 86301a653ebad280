"""Is HI engaged on a passkey eval? Selections and predictions of exact LSA vs HI on the same examples.

`bench/hi_passkey.sh` compares passkey accuracy of exact LSA and HI through the engine; equal accuracies
could also mean that HI never changed a selection. This script runs `evals.longctx.predict_answers` (the
eval's own engine path) on one depth's examples twice, exact and with HI forced on from the first sparse row
(pages of `--page` tokens, sub-blocks of `--block`, `--top-pages` kept), captures every index owner's
selected positions per query row, and prints how many rows HI selected differently and whether every
predicted token is the same.

    .venv/bin/python bench/hi_passkey_rows.py --model runs/lsa/e5/S_yarn_ft --length 1024 --top-pages 32
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat2.evals.longctx import predict_answers  # noqa: E402
from longcat2.evals.tasks import make_examples  # noqa: E402
from longcat2.hf_checkpoint import load_pretrained  # noqa: E402
from longcat2.model.longcat import LongCatForCausalLM  # noqa: E402
from longcat2.model_dir import resolve_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder / checkpoint / run folder")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--depth", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=1236)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--top-pages", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = load_pretrained(LongCatForCausalLM, resolve_model_dir(args.model), dtype=torch.float32)
    state = base.state_dict()
    examples = make_examples("passkey", args.examples, args.length, args.seed, [args.depth])
    hi = dict(
        lsa_hi=True,
        lsa_hi_min_len=1,
        lsa_hi_page_size=args.page,
        lsa_hi_block_size=args.block,
        lsa_hi_top_pages=args.top_pages,
    )
    selected: dict[str, list[torch.Tensor]] = {}
    predicted = {}
    for arm, fields in {"exact": {}, "hi": hi}.items():
        model = LongCatForCausalLM(base.config.replace(**fields).validate())
        model.load_state_dict(state)
        model.eval()
        seen: list[torch.Tensor] = []  # per owner call: selected positions [rows, top-k]
        owners = [layer.self_attn[0] for layer in model.model.layers]
        hooks = [
            o.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out[1][0].clone()))
            for o in owners
        ]
        predicted[arm] = predict_answers(model, examples, batch_size=1)
        for h in hooks:
            h.remove()
        selected[arm] = seen
    rows = differ = 0
    for a, b in zip(selected["exact"], selected["hi"], strict=True):
        for ra, rb in zip(a, b, strict=True):
            rows += 1
            differ += int(set(ra.tolist()) != set(rb.tolist()))
    n_pages = args.length // args.page
    print(
        f"{args.model}: {args.examples} passkey examples of {args.length} tokens at depth {args.depth}; HI pages "
        f"of {args.page}, sub-blocks of {args.block}, {args.top_pages} of {n_pages} pages kept"
    )
    print(f"selection rows {rows}; HI's selected set differs from exact in {differ} ({differ / rows:.1%})")
    same = predicted["exact"] == predicted["hi"]
    print(f"every predicted token the same: {'yes' if same else 'no'}")


if __name__ == "__main__":
    main()
