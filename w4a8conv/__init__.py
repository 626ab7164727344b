"""w4a8conv: process msModelSlim W4A8_DYNAMIC checkpoints offline into the Ascend operators' layout."""

__version__ = "0.1.0"
