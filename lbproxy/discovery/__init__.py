"""Discovery sources: each only turns what it reads into EndpointsDiscovered events."""
