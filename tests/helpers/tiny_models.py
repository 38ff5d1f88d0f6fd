"""Tiny transformers configs of each architecture for executor tests (random weights): every
dimension small, every feature on (attention bias, a folded shared expert, a 4-tap conv)."""

from __future__ import annotations

BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
CONFIGS = {
    "qwen3_next": dict(BASE, model_type="qwen3_next", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                       full_attention_interval=2),
    "qwen3_moe": dict(BASE, model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      norm_topk_prob=True),
    "llama": dict(BASE, model_type="llama", attention_bias=True),
}
