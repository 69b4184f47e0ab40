"""SafeAnchor inside training loops people already use (`hf_trainer`: transformers' Trainer and
TRL's SFTTrainer). Each imports its framework; `import safeanchor` alone does not."""
