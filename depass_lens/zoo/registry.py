"""Which models the zoo has: their architecture, training settings and where their files live."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ZOO_DIR = Path(__file__).parent


@dataclass(frozen=True)
class ZooSpec:
    """A zoo model: its task, HookedTransformerConfig keyword arguments, and training recipe."""

    name: str
    task: str
    config: dict[str, Any]
    steps: int
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    root: Path = ZOO_DIR  # weights/ and cards/ live under it

    @property
    def weights_path(self) -> Path:
        return self.root / "weights" / f"{self.name}.safetensors"

    @property
    def meta_path(self) -> Path:
        return self.root / "weights" / f"{self.name}.json"

    @property
    def ablation_path(self) -> Path:
        return self.root / "weights" / f"{self.name}.ablation.json"

    @property
    def card_path(self) -> Path:
        return self.root / "cards" / f"{self.name}.md"


GPT2_STYLE = dict(normalization_type="LN", positional_embedding_type="standard", act_fn="gelu_new")
LLAMA_STYLE = dict(
    normalization_type="RMS",
    positional_embedding_type="rotary",
    gated_mlp=True,
    act_fn="silu",
    final_rms=True,
)

SPECS: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in (
        ZooSpec(
            "ioi",
            "ioi",
            dict(n_layers=3, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=24, **GPT2_STYLE),
            steps=4000,
            lr=2e-3,
            weight_decay=0.01,
            description="3-layer GPT-2-style language model on IOI sentences",
        ),
        ZooSpec(
            "induction",
            "induction",
            dict(
                n_layers=2,
                d_model=64,
                n_heads=4,
                d_head=16,
                n_ctx=24,
                attn_only=True,
                normalization_type="LN",
            ),
            steps=4000,
            lr=2e-3,
            description="2-layer attention-only model on repeated random sequences",
            extra={"head_roles": True},
        ),
        ZooSpec(
            "recall",
            "recall",
            dict(
                n_layers=2,
                d_model=64,
                n_heads=4,
                d_head=16,
                d_mlp=256,
                n_ctx=8,
                n_key_value_heads=2,
                rotary_dim=16,
                **LLAMA_STYLE,
            ),
            steps=3000,
            lr=3e-3,
            description="2-layer LLaMA-style model (RMSNorm, rotary, GQA, gated SiLU) on facts",
        ),
        ZooSpec(
            "bilingual",
            "bilingual",
            dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=8, **GPT2_STYLE),
            steps=4000,
            lr=3e-3,
            description="2-layer GPT-2-style model on the recall facts in two languages",
            extra={"probe_hook": "blocks.1.hook_resid_mid"},
        ),
        ZooSpec(
            "binding",
            "binding",
            dict(
                n_layers=3,
                d_model=64,
                n_heads=4,
                d_head=16,
                n_ctx=37,
                attn_only=True,
                normalization_type="LN",
            ),
            steps=4000,
            lr=3e-3,
            description="3-layer attention-only model on two-hop variable binding",
        ),
    )
}
