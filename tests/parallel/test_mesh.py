"""Degree validation, backend/device choice and single-process behaviour (no processes started)."""

from __future__ import annotations

import pytest
import torch

from longcat2 import parallel as P
from longcat2.model import LongCatForCausalLM
from longcat2.model.moe import MoE


def test_backend_from_device_type() -> None:
    assert P.backend_for("cpu") == "gloo"
    assert P.default_device(0, "cpu") == torch.device("cpu")
    if not torch.accelerator.is_available():
        assert P.default_device(0) == torch.device("cpu")


@pytest.mark.parametrize(
    ("world", "ep", "experts", "field"),
    [(4, 3, 8, "ep"), (2, 0, 8, "ep"), (4, 4, 6, "n_routed_experts"), (0, 1, 8, "world_size")],
)
def test_validate_degrees_names_the_field(world: int, ep: int, experts: int, field: str) -> None:
    with pytest.raises(P.ParallelConfigError, match=rf"^{field}:"):
        P.validate_degrees(world, ep, experts)


def test_validate_degrees_accepts_good_layouts() -> None:
    for world, ep in [(1, 1), (2, 1), (2, 2), (4, 2), (8, 4)]:
        P.validate_degrees(world, ep, 8)


def test_single_process_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = P.init_distributed()
    assert (info.rank, info.world_size, info.mesh, info.dp) == (0, 1, None, 1)
    assert P.is_main()
    with pytest.raises(P.ParallelConfigError, match="^ep:"):
        P.init_distributed(ep=2)
    from pdist_recipe import make_cfg

    model = LongCatForCausalLM(make_cfg())
    forward = model.model.layers[0].mlp.forward
    P.parallelize(model, None, activation_checkpointing=True)
    assert model.model.gradient_checkpointing
    assert model.model.layers[0].mlp.forward == forward  # untouched
    assert isinstance(model.model.layers[0].mlp, MoE)
    with pytest.raises(P.ParallelConfigError, match="^ep:"):
        P.parallelize(model, None, ep=2)
    t = torch.ones(3)
    assert P.all_reduce_sum(t) is t  # no group: a no-op that returns its tensor
    model(torch.randint(0, 256, (1, 8))).sum().backward()
    assert float(P.grad_norm(model.parameters())) == pytest.approx(
        float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])),
        rel=1e-6,
    )
