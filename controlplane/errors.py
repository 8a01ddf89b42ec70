"""The error every manifest parser raises for a document it cannot use."""


class ManifestError(ValueError):
    """A manifest that does not describe a usable object; the message says what and where."""
