"""The nucleus network: architecture, losses, data, augmentation, training, inference, model folders."""
