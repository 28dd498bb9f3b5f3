"""File formats: validated readers, atomic writes, exports, restricted unpickling."""
