"""tllib-compatible names for finereg's head regularizers (re-exported by finereg.compat.tllib)."""
__all__: list[str] = []
