"""The sans-I/O endpoint pool: events in, actions out, no clock and no sockets."""
