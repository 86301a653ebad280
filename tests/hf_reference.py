"""The independent reference for parity tests: a random transformers LongcatFlashForCausalLM built from one of
our presets, with a non-zero router correction bias (selection must use it, gates must not).

transformers 5.0-5.24 stacked the experts' gate/up over routed + zero (identity) experts and wrote/required
gate/up tensors for the identity experts; 5.25 stacks the routed experts only, as the released checkpoints
do. `legacy_zero_expert_layout` tells which one the installed release uses."""

import pytest
import torch
from packaging.version import Version

from longcat2.config import ModelConfig

# config.json keys transformers' LongcatFlashConfig does not take as constructor arguments
_NOT_HF_ARGS = {"architectures", "model_type", "torch_dtype", "rope_scaling", "mtp_num_layers"}


def random_longcat_flash(rope_scaling=None, preset: str = "tiny-flash"):
    """→ (transformers module, our ModelConfig, the transformers model in eval mode)."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.from_preset(preset, rope_scaling=rope_scaling)
    hf_cfg = transformers.LongcatFlashConfig(
        **{k: v for k, v in cfg.to_hf().items() if k not in _NOT_HF_ARGS}
    )
    hf = transformers.LongcatFlashForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return transformers, cfg, hf


def legacy_zero_expert_layout(transformers) -> bool:
    """True for transformers < 5.25, which writes and requires gate/up tensors for the zero experts."""
    return Version(transformers.__version__).release < (5, 25)
