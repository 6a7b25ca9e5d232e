"""The snapshot manager process (ftd daemon): store, server."""
