"""Inference engine: paged latent + indexer-key cache, cached LSA decode, chunked prefill, continuous
batching, sampling, streaming and MTP speculative decoding.

    from longcat2.engine import Engine, SamplingParams, generate
"""

from longcat2.engine.api import Engine, generate
from longcat2.engine.sampling import SamplingParams
from longcat2.engine.scheduler import RequestOutput

__all__ = ["Engine", "RequestOutput", "SamplingParams", "generate"]
