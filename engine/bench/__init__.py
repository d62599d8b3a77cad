"""Benchmarks: the samplers' latency, the engine service over HTTP, and the language server over the protocol."""
