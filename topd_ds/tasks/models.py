"""Tiny transformers models built from configs (no hub): the arith teacher/student and test models.

`build_model` returns a random-init causal LM of the Qwen3 or Llama architecture whose special-token ids
match the tokenizer; `save_model` writes it with `save_pretrained` (plus the tokenizer) atomically.
"""

import os

ARCHS = ("qwen3", "llama")


def model_config(arch: str, *, vocab_size: int, hidden: int, layers: int, heads: int = 4,
                 kv_heads: int | None = None, max_positions: int = 512, pad_id: int = 0,
                 bos_id: int = 1, eos_id: int = 2, tie_embeddings: bool = True):
    """A transformers config for a tiny decoder (intermediate = 3 x hidden)."""
    from transformers import LlamaConfig, Qwen3Config

    if arch not in ARCHS:
        raise ValueError(f"arch: must be one of {ARCHS}, got {arch!r}")
    cls = Qwen3Config if arch == "qwen3" else LlamaConfig
    extra = {"head_dim": hidden // heads} if arch == "qwen3" else {}
    return cls(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads, max_position_embeddings=max_positions,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
        tie_word_embeddings=tie_embeddings, torch_dtype="float32", **extra,
    )


def build_model(arch: str = "qwen3", *, seed: int = 0, **config_kwargs):
    """A random-init causal LM (float32, eval mode) from `model_config(arch, **config_kwargs)`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, **config_kwargs))
    return model.float().eval()


def save_model(model, out_dir: str, tokenizer=None) -> str:
    """save_pretrained into a temp dir beside `out_dir`, then rename: never a half-written model dir."""
    from topd_ds.fsutil import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return os.path.abspath(out_dir)


def save_tiny_pair(root: str, tokenizer=None) -> tuple:
    """(teacher_dir, student_dir) under root: the suite's random Qwen3 teacher (64 x 2) and student (32 x 1) on one
    tokenizer (default the character-level one). tests/conftest.py's tiny_models, scripts/soak.py and
    scripts/ctrl_c_stress.py build them here."""
    if tokenizer is None:
        from topd_ds.tasks.chartok import build_char_tokenizer
        tokenizer = build_char_tokenizer()
    common = dict(vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id, bos_id=tokenizer.bos_token_id,
                  eos_id=tokenizer.eos_token_id, max_positions=256)
    teacher = build_model("qwen3", seed=1, hidden=64, layers=2, heads=4, **common)
    student = build_model("qwen3", seed=2, hidden=32, layers=1, heads=4, **common)
    return (save_model(teacher, os.path.join(root, "teacher"), tokenizer),
            save_model(student, os.path.join(root, "student"), tokenizer))
