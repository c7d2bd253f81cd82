"""What a running node shows: the status socket, health and metrics, packet traces, the
drop log, logs."""
