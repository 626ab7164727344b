"""The plugin's logger: vLLM's when vLLM is there, so its lines show in vLLM's output."""

from __future__ import annotations

import logging


def _logger() -> logging.Logger:
    """vLLM's logger when vLLM is there, so the lines show in its output; the standard one otherwise."""
    try:
        from vllm.logger import init_logger
    except ImportError:
        return logging.getLogger(__name__)
    return init_logger(__name__)


log = _logger()
