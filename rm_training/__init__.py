"""ARM training for genarm-serve: autoregressive reward models from preference pairs (TRL + PEFT).

Entry points: the `genarm-train` CLI (rm_training.cli), `rm_training.pipeline.train_arm(TrainConfig)`.
See rm_training/README.md.
"""
