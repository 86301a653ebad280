"""The LongCat model: layers, MLA, LSA, MoE, N-gram embedding, decoder + MTP."""

from longcat2.model.longcat import LongCatForCausalLM, LongCatOutput

__all__ = ["LongCatForCausalLM", "LongCatOutput"]
