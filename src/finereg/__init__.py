"""finereg: regularized fine-tuning and weight-structure constraints for PyTorch."""
__version__ = "0.1.0"
