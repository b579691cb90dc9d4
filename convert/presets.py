"""Shape-defining config fields of the released models (their Hub config.json files), for estimates
without a download.  A checkpoint's own config.json always wins when converting."""

from __future__ import annotations

_COMMON = dict(
    num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64, o_lora_rank=1024,
    n_shared_experts=1, num_experts_per_tok=6, vocab_size=129280, num_hash_layers=3,
    sliding_window=128, index_n_heads=64, index_head_dim=128, index_topk=512, hc_mult=4,
    num_nextn_predict_layers=1, expert_dtype="fp4", scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5, swiglu_limit=10.0, tie_word_embeddings=False,
)

PRESETS = {
    # layers 0-1 sliding only, then CSA (4) and HCA (128) alternating: 21 CSA, 20 HCA
    "flash": dict(_COMMON, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64,
                  q_lora_rank=1024, o_groups=8, n_routed_experts=256, moe_intermediate_size=2048,
                  compress_ratios=[0, 0] + [4 if i % 2 == 0 else 128 for i in range(41)]),
    # transformers' V4-Pro default layer pattern: two HCA layers, then HCA/CSA interleaved
    "pro": dict(_COMMON, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
                q_lora_rank=1536, o_groups=16, n_routed_experts=384, moe_intermediate_size=3072,
                compress_ratios=[128, 128] + [4 if i % 2 else 128 for i in range(59)]),
}
