"""msModelSlim 1.0.0 with ``group_size`` 0: two int4 per byte, one scale per output channel, a stored scale_bias.

As :mod:`.v1_per_group` without ``weight_scale_second`` and ``weight_offset_second``. msModelSlim
26.1's current saver writes only this layout.
"""

from __future__ import annotations

from .v1_per_group import V1PerGroupLayout


class V1PerChannelLayout(V1PerGroupLayout):
    name = "v1.0.0-per-channel"
    summary = "msModelSlim 1.0.0, group_size 0: int8 [out/2, in] two int4 per byte, per-channel scales, scale_bias"
    per_group = False
    synthetic_linear = False  # vllm-ascend has no per-channel W4A8 Linear
