"""The one exception type for data problems a user can cause: a missing or empty corpus, an
unreadable file, a bad configuration value, shards that do not fit the tokenizer or the model.
Messages name the offending path or value and what was expected."""


class DataError(ValueError):
    """A data-pipeline error caused by input or configuration (not an internal bug)."""
