"""EP dispatch/combine on 2 real processes: skewed routing, experts without tokens, zero experts stay local;
mesh validation errors inside a real process group (one job, to pay the process start-up once)."""

from __future__ import annotations

import pdist_workers as W
from pdist_launch import run_distributed


def test_dispatch_combine_skewed_routing() -> None:
    # Each case compares the EP MoE (output, input grad, router grad, expert-weight grads) with the
    # single-device MoE on the same inputs, inside the workers (assert_close, 1e-5).
    per_rank = run_distributed(W.dispatch_worker, 2)
    for rank, rep in enumerate(per_rank):
        # all slots on zero experts: nothing crosses the network with short-circuiting, everything without
        assert rep["all_zero"]["routed_slots"] == 0
        assert rep["all_zero"]["short_circuit_rows_sent"] == 0
        assert rep["all_zero"]["no_short_circuit_rows_sent"] > 0
        for case, r in rep.items():
            if case == "errors":
                continue
            assert r["short_circuit_rows_sent"] <= r["no_short_circuit_rows_sent"], (rank, case)
    # mixed: rank 0 routes only to zero experts but still serves rank 1's rows for expert 0
    assert per_rank[0]["mixed"]["routed_slots"] == 0
    assert per_rank[0]["mixed"]["short_circuit_rows_sent"] == per_rank[1]["mixed"]["routed_slots"] > 0
    # same job: mesh/degree validation in a real 2-rank group names the field
    msgs = per_rank[0]["errors"]
    assert msgs["world_size"].startswith("world_size:")
    assert msgs["n_routed_experts"].startswith("n_routed_experts:") and "ep=2" in msgs["n_routed_experts"]
    assert msgs["ep"].startswith("ep:")
