"""C sources of engine.native (data of the package; nothing to import here)."""
