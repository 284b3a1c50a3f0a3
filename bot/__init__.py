"""sprbot's shared core: configuration, schemas, the Redis bus, stores and chat commands.

It imports no adapter and no model code, so every process can use it cheaply.
"""
