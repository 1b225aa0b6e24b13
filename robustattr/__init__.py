"""robustattr: train image classifiers whose attributions are hard to manipulate, attack them while they
train, and audit any checkpoint afterwards."""

__version__ = "0.1.0"
