"""Job arrays on a real Slurm (``make test-slurm``)."""
