"""Vocabulary trimming and alignment between tokenizers (byte spans, first-piece maps)."""
