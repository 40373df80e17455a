"""Generation beyond this process: Ray Serve replicas on local or cluster GPUs and CPUs."""
