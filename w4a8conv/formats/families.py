"""The model families msModelSlim writes W4A8 checkpoints of, as ``w4a8conv synthetic --family`` writes
them: where each puts its tensors, what msModelSlim's W4A8 recipe for it quantizes, and its public shapes.
A family is a row of data, not code.

Names and types follow msModelSlim 26.1's own adapters and lab_practice recipes (``deepseek_v4_pro_w4a8``,
``glm_5_w4a8``, ``qwen3.5_moe_w4a8``); shapes follow each model's published configuration (DeepSeek-V4:
the Flash sizes of msModelSlim's ``deepseek_v4/model.py``; GLM-5: its ``glm_5/model.py``; Qwen3.5-MoE:
Qwen3.5-397B-A17B's card; MiniMax-M2: its config.json).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..experts import DEFAULT_NAMING, NAMINGS, ExpertNaming


@dataclass(frozen=True)
class PublicShapes:
    """A model's published sizes, which ``--size-gb`` uses (experts and layers are then scaled)."""

    hidden: int
    intermediate: int  # moe_intermediate_size
    experts: int
    dense_layers: int
    moe_layers: int


@dataclass(frozen=True)
class Family:
    name: str  # --family
    label: str
    model_type: str  # config.json's, which vllm-ascend's renaming keys on
    architecture: str
    layer: str  # a decoder layer's prefix, with {n}
    mtp_layer: str | None  # an MTP layer's prefix with {n} counted from 0; None: numbered after the decoder's
    mlp: str  # the MoE block under a layer: mlp, ffn
    naming: ExpertNaming
    shared: str | None  # the shared experts' module under the MoE block (W8A8_DYNAMIC)
    mtp_experts: str  # the quant type msModelSlim's recipe gives the MTP layer's experts
    attention: str  # "mla" (DeepSeek-V3's MLA, possibly with W4A8 Linear), or the module of plain W8A8 ones
    attention_projections: tuple[str, ...] = ()
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    outside: tuple[str, str, str] = ("model.embed_tokens", "model.norm", "lm_head")  # embeddings, final norm, head
    dotless: tuple[str, ...] = ()  # FLOAT tensors whose names have no dot
    rotation_file: bool = False  # GLM-5: rot.safetensors with rot.weight [hidden, hidden], outside the description
    quarot: bool = True  # QuaRot's optional/quarot.safetensors
    text_config: bool = False  # config.json nests the language model's sizes under text_config
    w4a8_linear: bool = False  # SyntheticSpec.w4a8_linear applies (attention W4A8 Linear, per-group layouts)
    practice: str = "DeepSeek-V3_best_practice.yaml"  # the recipe file msModelSlim leaves beside the weights
    mtp: bool = True  # has multi-token-prediction layers
    experts_key: str = "n_routed_experts"  # config.json's names of the routed experts and their size
    intermediate_key: str = "moe_intermediate_size"
    public: PublicShapes = field(default=PublicShapes(7168, 2048, 256, 3, 58))

    def layer_prefix(self, block: int, decoder_layers: int) -> str:
        """The prefix of decoder (or MTP) layer ``block``; MTP layers come after the decoder's."""
        if block >= decoder_layers and self.mtp_layer is not None:
            return self.mtp_layer.format(n=block - decoder_layers)
        return self.layer.format(n=block)


_W123 = NAMINGS[1]
FAMILIES = {
    family.name: family
    for family in (
        Family(
            "deepseek-v3",
            "DeepSeek-V3/R1",
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            layer="model.layers.{n}",
            mtp_layer=None,
            mlp="mlp",
            naming=DEFAULT_NAMING,
            shared="shared_experts",
            mtp_experts="W8A8_DYNAMIC",
            attention="mla",
            w4a8_linear=True,
        ),
        Family(
            "deepseek-v4",
            "DeepSeek-V4",
            "deepseek_v4",
            "DeepseekV4ForCausalLM",
            layer="layers.{n}",
            mtp_layer="mtp.{n}",
            mlp="ffn",
            naming=_W123,
            shared="shared_experts",
            mtp_experts="W4A8_DYNAMIC",
            attention="attn",
            attention_projections=("wq_a", "wq_b", "wkv"),
            norms=("attn_norm", "ffn_norm"),
            outside=("embed", "norm", "head"),
            dotless=("hc_head_fn", "hc_head_base", "hc_head_scale"),
            practice="deepseek_v4_pro_w4a8.yaml",
            public=PublicShapes(4096, 2048, 256, 0, 43),
        ),
        Family(
            "glm-5",
            "GLM-5",
            "glm_moe_dsa",
            "GlmMoeDsaForCausalLM",
            layer="model.layers.{n}",
            mtp_layer=None,
            mlp="mlp",
            naming=DEFAULT_NAMING,
            shared="shared_experts",
            mtp_experts="FLOAT",
            attention="mla",
            rotation_file=True,
            quarot=False,
            practice="glm_5_w4a8.yaml",
            public=PublicShapes(6144, 2048, 256, 3, 75),
        ),
        Family(
            "qwen3.5-moe",
            "Qwen3.5-MoE",
            "qwen3_5_moe",
            "Qwen3_5MoeForConditionalGeneration",
            layer="model.language_model.layers.{n}",
            mtp_layer="mtp.layers.{n}",
            mlp="mlp",
            naming=DEFAULT_NAMING,
            shared=None,  # its shared_expert stays in the model dtype: the recipe quantizes *mlp.experts* only
            mtp_experts="FLOAT",
            attention="self_attn",
            attention_projections=("q_proj", "k_proj", "v_proj"),
            outside=("model.language_model.embed_tokens", "model.language_model.norm", "lm_head"),
            quarot=False,
            text_config=True,
            practice="qwen3.5_moe_w4a8.yaml",
            experts_key="num_experts",
            public=PublicShapes(4096, 1024, 512, 0, 60),
        ),
        Family(
            "minimax-m2",
            "MiniMax-M2",
            "minimax_m2",
            "MiniMaxM2ForCausalLM",
            layer="model.layers.{n}",
            mtp_layer=None,
            mlp="block_sparse_moe",
            naming=_W123,
            shared=None,
            mtp_experts="FLOAT",
            attention="self_attn",
            attention_projections=("q_proj", "k_proj", "v_proj"),
            quarot=False,
            practice="minimax_m2_w4a8.yaml",
            mtp=False,
            experts_key="num_local_experts",
            intermediate_key="intermediate_size",
            public=PublicShapes(3072, 1536, 256, 0, 62),
        ),
    )
}
DEFAULT_FAMILY = "deepseek-v3"
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)  # the default first
