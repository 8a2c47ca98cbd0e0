"""HTTP routes: thin; the work is in the engine, the store and the service modules."""
