"""tllib-compatible names for finereg's feature regularizers (re-exported by finereg.compat.tllib)."""
__all__: list[str] = []
