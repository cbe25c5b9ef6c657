"""Small helpers every layer may use: paths, atomic output folders, a quiet start, registries."""
