"""The formats and their math, with no I/O: int4 packing, scales and biases, the canary's contents, and
the plug-ins, source layouts (what msModelSlim or LLM-Compressor wrote) and serving targets (what an
engine release reads)."""
