"""topd-ds: on-policy distillation (OPD) and trajectory-aware OPD (TOPD, arXiv 2606.00305) on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
