"""Fine-tuning: models, data, loss, attention, the training loop, checkpoints, distributed runs,
evaluation and the run report. Imports `lorakit.core` and `lorakit.methods`."""
