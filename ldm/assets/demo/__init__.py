"""The embedded demo model: shapes.safetensors (see docs/demo_model.md)."""
