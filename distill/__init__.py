"""The distillation engine: a pure library (no web imports); may import teachers/."""
