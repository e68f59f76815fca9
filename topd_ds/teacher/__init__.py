"""The teacher on the trainer's own ranks (teacher.scoring: local): its ZeRO-3 forward to final hidden states for
each micro-batch, and the tables (lm_head, OT embeddings) read from its files."""
