"""Inference engine: KV cache, sampling, the generate loop (and later scheduling, speculative decoding)."""
