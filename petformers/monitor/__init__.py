"""What a run writes so that it can be watched: its state file and TensorBoard event files."""
