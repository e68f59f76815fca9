"""The student's lm_head applied inside the chunked losses, also under ZeRO-3.

The losses take the student's final hidden states (B, T, H) and its lm_head weight (V, H) and apply the
head chunk by chunk (topd_ds/loss/chunked.py), so no (T, V) logits tensor exists for a whole sequence. Under
ZeRO-3 the weight is partitioned: outside its own module's forward each rank holds only a shard (an empty
`param.data`). `LossHead` is a parameterless submodule of the student on which the weight is registered
as a DeepSpeed *external parameter*: DeepSpeed then gathers it when `LossHead.forward` starts and again when
the backward reaches that forward's outputs, and releases it after each, like any module's own weight. Once
per forward and once per backward, whatever the number of chunks, so every rank runs the same collectives
(docs/TRAINING.md, "Uniform collectives in the objective"). Tied embeddings are the same parameter, which
DeepSpeed partitions once.

    attach_loss_head(model)                 # before deepspeed.initialize (DeepSpeed hooks every submodule then)
    per = loss_head(engine)(fn, hidden, …)  # fn(head_weight, hidden, …) -> loss tensors

The gradient of the weight is accumulated over the chunks inside the loss's backward and handed to autograd
once, so DeepSpeed's gradient hook fires once per backward, as for a plain Linear.
"""

import torch

ATTR = "topd_loss_head"


class LossHead(torch.nn.Module):
    """forward(fn, *tensors) = fn(lm_head weight, *tensors); holds the lm_head by reference (not a child)."""

    def __init__(self, lm_head: torch.nn.Module):
        super().__init__()
        self._lm_head = [lm_head]  # a list: not registered as a submodule, so its weight is not counted twice

    @property
    def weight(self) -> torch.nn.Parameter:
        return self._lm_head[0].weight

    def forward(self, fn, *tensors):
        return fn(self.weight, *tensors)


def _hf_model(model):
    return getattr(model, "module", model)  # a DeepSpeed engine wraps the transformers model


def attach_loss_head(model) -> LossHead:
    """Give `model` (a transformers causal LM) its LossHead; under ZeRO-3 (a partitioned weight) register the
    lm_head weight as the head's external parameter. Call it before deepspeed.initialize."""
    model = _hf_model(model)
    head = getattr(model, ATTR, None)
    if head is None:
        lm_head = model.get_output_embeddings()
        if lm_head is None or getattr(lm_head, "bias", None) is not None:
            raise ValueError(f"{type(model).__name__}: needs a bias-free lm_head (get_output_embeddings)")
        head = LossHead(lm_head)
        setattr(model, ATTR, head)
        if hasattr(lm_head.weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(head, lm_head.weight)
    return head


def loss_head(model) -> LossHead:
    """The model's LossHead. Under ZeRO-3 it must have been attached before deepspeed.initialize."""
    m = _hf_model(model)
    head = getattr(m, ATTR, None)
    if head is not None:
        return head
    if hasattr(m.get_output_embeddings().weight, "ds_id"):
        raise RuntimeError("loss_head: a ZeRO-3 model needs attach_loss_head(model) before deepspeed.initialize")
    return attach_loss_head(m)
