"""Stage 1 (off-policy KD): `topd-ds sample` writes the teacher's responses offline; `data` turns them into
KD batches and losses."""
