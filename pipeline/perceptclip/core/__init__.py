"""The floor every room stands on: the config dialect and its loader, storage, the console, metrics,
the score table's schema and tasks as data. Imports nothing of the package above it."""
