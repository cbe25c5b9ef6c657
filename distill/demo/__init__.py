"""The demos' packaged models and text, converted from installed registry packages."""
