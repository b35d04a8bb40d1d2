"""Storage backends: the primitives each engine provides (see base.py)."""
