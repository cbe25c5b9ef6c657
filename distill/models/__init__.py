"""Models: safe loading, teacher plans and the frozen ensemble, the student, pruning, pooled heads, layer hooks."""
