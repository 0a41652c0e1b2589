"""Training: the SFTTrainer and what a run writes (checkpoints, output folder, model card, report)."""
