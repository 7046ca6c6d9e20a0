"""The cross-backend conformance suite: pytest tests/conformance --backend NAME."""
