"""Data-free distillation of CLIP-class teachers into small students (importable core of the DVC pipeline)."""
