"""tllib-compatible names for finereg's weight regularizers (re-exported by finereg.compat.tllib)."""
__all__: list[str] = []
