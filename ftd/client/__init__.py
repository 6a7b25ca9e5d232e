"""Trainer side: Snapshotter, state capture, copy engine, restore."""
