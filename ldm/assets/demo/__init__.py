"""The embedded demo model: shapes.safetensors (how it was trained: recipes/shapes_demo/ in the repository)."""
