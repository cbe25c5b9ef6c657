"""Teacher interpolation: one registered strategy class per name, each owning its fit; routing."""
