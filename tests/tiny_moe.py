"""A tiny random Qwen3-MoE teacher (transformers Qwen3MoeConfig, offline): the paper teacher's architecture
(Qwen3-30B-A3B: every layer a sparse MoE block, top-k routing, fused experts) at toy size."""

import torch


def build_moe_teacher(out_dir: str, tokenizer, *, seed: int = 3, hidden: int = 32, layers: int = 2,
                      experts: int = 8, top_k: int = 2) -> str:
    """Write a random-init Qwen3MoeForCausalLM (float32) with `tokenizer`'s vocabulary to out_dir."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from topd_ds.tasks.models import save_model

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, moe_intermediate_size=hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=experts, num_experts_per_tok=top_k, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        initializer_range=0.2)  # wide router weights: tokens spread over the experts
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(config).float().eval()
    assert all(torch.isfinite(p).all() for p in model.parameters()), "non-finite init"
    return save_model(model, out_dir, tokenizer)
