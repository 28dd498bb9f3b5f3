"""The training jobs (`config.job`): distillation, teacher pre-training, UD2M."""
