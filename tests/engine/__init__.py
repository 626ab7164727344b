"""Tests against the real vLLM and vllm-ascend (``make test-engine``)."""
