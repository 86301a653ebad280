"""longcat2: LongCat-2.0 (ScMoE + MLA + zero experts + N-gram embedding + LSA + MTP) in pure PyTorch."""

from longcat2.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig", "LongCatForCausalLM"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so `import longcat2` (and the CLI) does not import torch until a model is needed.
    if name == "LongCatForCausalLM":
        from longcat2.model.longcat import LongCatForCausalLM

        return LongCatForCausalLM
    raise AttributeError(f"module 'longcat2' has no attribute {name!r}")
