"""What moves between processes: DeepSpeed start-up, rank 0's batch to each rank (transport, batch scatter),
the student's weights to its server (weight sync and the process group it shares with the servers)."""
