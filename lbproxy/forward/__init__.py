"""The data path: accept clients, dial the pool's pick, and move bytes both ways."""
