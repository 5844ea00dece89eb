"""Training: the Lightning system around the plain-torch model, and the `train` stage's fit."""
