"""Fine-tuning: config, the Ray Train driver and worker, data, labels, datasets and converters, losses,
augmentation, validation and evaluation."""
