"""The teacher's tables read from its safetensors files without building the model: the lm_head (V, H) the
full-vocabulary losses apply chunk by chunk, and the input embeddings of the OT ground cost."""

import os

from topd_ds.errors import ConfigError


def load_teacher_tables(cfg):
    """The teacher's lm_head (V, H) for full-vocab losses and the embedding table of the OT ground cost,
    read from the model dirs without building the models."""
    from safetensors import safe_open
    from transformers import AutoConfig

    def tensors(model_dir):
        out = {}
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(model_dir, name), "pt") as f:
                    for key in f.keys():
                        if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
                            out[key.split(".")[-2]] = f.get_tensor(key).float()
        if "embed_tokens" not in out:
            raise ConfigError(f"{model_dir}: no embed_tokens weight in its safetensors files")
        return out

    teacher = tensors(cfg.model.teacher)
    tied = AutoConfig.from_pretrained(cfg.model.teacher).tie_word_embeddings
    head = teacher["embed_tokens"] if tied or "lm_head" not in teacher else teacher["lm_head"]
    emb_src = teacher if cfg.model.ot_embedding == "teacher" else tensors(cfg.model.student)
    return head, emb_src["embed_tokens"]
