"""``make test-engine`` runs this folder in its own venv (vLLM and vllm-ascend 0.23.0, torch_npu stood in)."""
