"""HunyuanVideo (``HunyuanVideoPipeline``): ``HunyuanVideoTransformer3DModel``.

Joint attention: the double-stream blocks (``transformer_blocks.i.attn``) and single-stream
blocks (``single_transformer_blocks.i.attn``) attend over [video tokens, text tokens], text as a
suffix, with text padding masked by an attention mask. The token refiner's attention is over text
only and is left alone. Latents are [B, C, F, H, W], grid (F / p_t, H / p, W / p).
"""

from __future__ import annotations

from ..methods import RadialConfig
from .base import CallFacts, ModelAdapter, blocks

# Radial Attention (Li et al. 2025, mit-han-lab/radial-attention), HunyuanVideo T2V: 12 of 50 steps
# dense (as a fraction: it follows the call's step count), decay_factor 0.95, no dense layers
# (its scripts/hunyuan_t2v_inference.sh: dense_layers=0, dense_timesteps=12).
PRESET = RadialConfig(dense_steps=12 / 50, decay_factor=0.95)
# A method named by the user starts from its published HunyuanVideo setting: radial as above; Sparse
# VideoGen keeps 10% of the steps dense ('heads'); Sliding Tile Attention 15 of 50 ('tile').
METHOD_DEFAULTS = {
    "radial": {"dense_steps": PRESET.dense_steps, "decay_factor": PRESET.decay_factor},
    "heads": {"dense_steps": 0.1},
    "tile": {"dense_steps": 15 / 50},
}


class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    text_position = "suffix"
    # diffusers 0.42.1 has no _cp_plan for it: pass cp_plan() to enable_parallelism; [latent_r | text_r]
    context_parallel_streams = True
    preset_source = ("Radial Attention (Li et al. 2025, mit-han-lab/radial-attention): HunyuanVideo radial, 12 of 50 "
                     "steps dense (0.24), no dense layers, decay_factor 0.95. Published for other methods: Sparse "
                     "VideoGen 10% of steps dense ('heads', dense_steps=0.1); Sliding Tile Attention 15 of 50 "
                     "('tile', dense_steps=0.3)")

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        B, _, F, H, W = x.shape
        text_len = a["encoder_hidden_states"].shape[1]
        return CallFacts((F // pt, H // p, W // p), text_len, B, self.scalar_timestep(a.get("timestep")))

    def preset(self):
        return PRESET

    def method_defaults(self, method, target=None):
        return dict(METHOD_DEFAULTS.get(method, {}))


def cp_plan() -> dict:
    """A context-parallel plan for ``HunyuanVideoTransformer3DModel`` (diffusers 0.42.1 ships none):
    ``transformer.enable_parallelism(config=..., cp_plan=cp_plan())``. The latent and text streams are
    split along the sequence at the first double-stream block (after the token refiner, which attends
    over text only), the RoPE tables of the latent tokens likewise, the output gathered at ``proj_out``;
    the attention mask ([B, 1, 1, latent + text], built before the blocks) stays whole, in the
    model's order, which is how ditaccel's backend reads a mask of the whole length."""
    from diffusers.models._modeling_parallel import (
        ContextParallelInput,
        ContextParallelOutput,
    )

    stream = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
    rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {
        "transformer_blocks.0": {"hidden_states": stream, "encoder_hidden_states": stream},
        "rope": {0: rope, 1: rope},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
