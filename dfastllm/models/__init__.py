"""Native model families (LLaDA, Dream) and the checkpoint loader."""
