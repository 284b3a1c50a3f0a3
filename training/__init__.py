"""Fine-tuning. For now: the offline demo model's training loop (``training.demo``)."""
