"""Teacher caches on disk: the shard life cycle and one store per format."""
