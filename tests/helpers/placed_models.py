"""Tiny configs of the four base families that the placement tests run on two logical CPU devices."""

from __future__ import annotations

DEVS = ("cpu:0", "cpu:1")


BASE = dict(vocab_size=50, hidden_size=32, intermediate_size=36, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=3, head_dim=8)


CONFIGS = {
    "llama": dict(BASE, model_type="llama", attention_bias=True),
    "qwen3": dict(BASE, model_type="qwen3", tie_word_embeddings=True),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      mlp_only_layers=[1]),
    "qwen3_next": dict(BASE, model_type="qwen3_next", num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=8, shared_expert_intermediate_size=8, linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=4, linear_value_head_dim=4,
                       linear_conv_kernel_dim=3, full_attention_interval=2),
}


PROMPT = [5, 3, 9, 1, 1, 7, 2, 8]
