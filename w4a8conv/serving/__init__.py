"""The serving side: loading a processed checkpoint (``runtime``), a CPU reference of the Ascend
operators (``reference``), and the vLLM plugin that serves it and checks the engine first."""
