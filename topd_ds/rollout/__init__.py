"""What rank 0 produces ahead of the trainer: the pipeline (rollouts -> teacher scores -> candidates ->
probes -> OT -> labels), candidate selection, per-sample seeds, false-alarm labelling, the batch types."""
