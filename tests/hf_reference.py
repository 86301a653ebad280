"""The independent reference for parity tests: a random transformers LongcatFlashForCausalLM built from one of
our presets, with a non-zero router correction bias (selection must use it, gates must not)."""

import pytest
import torch

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
