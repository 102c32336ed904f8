"""PLACEHOLDER by the lead so the server imports; the toolkit engineer replaces this file."""


class FrozenError(AttributeError):
    pass
