"""Data: MNIST (fetch, verify, read), the user-feedback dataset, augmentation, the DataModule."""
