"""Teacher signals: the sources that turn a batch into teacher distributions, and the interpolated target."""
