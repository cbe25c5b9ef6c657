"""The typed config: every key, its type and default, validated once at load."""
