"""Training, checkpoints, feature extraction and evaluation of a model on a data set."""
