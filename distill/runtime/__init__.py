"""Where the code runs: the process group and collectives, the device and the teachers' dtype."""
