"""Channel adapters: each translates one chat platform to and from the bus in ``bot``."""
