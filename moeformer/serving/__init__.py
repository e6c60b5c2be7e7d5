"""Serving: continuous batching over a paged KV cache with prefix caching, chunked prefill and a compiled decode
step (`Engine`), one rank or several."""

from moeformer.serving.engine import Engine
from moeformer.serving.request import SamplingParams, StepOutput

__all__ = ["Engine", "SamplingParams", "StepOutput"]
