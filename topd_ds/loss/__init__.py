"""The loss of one micro-batch: the objective of each mode, the pure loss functions, packing (stage-2 windows,
stage-1 samples), the lm_head applied chunk by chunk inside the losses, sequence parallelism."""
