"""The model room's error, torch-free: the command line catches it without loading the model code."""


class ArtifactError(Exception):
    """A model artifact that is missing, malformed or fails its checksum."""
