from unetpp.server.settings import Settings


def drain_budget_s() -> float:
    """The longest a server takes to exit after SIGTERM with the default settings: the drain
    delay, then the requests in flight (up to the request timeout)."""
    fields = Settings.model_fields
    return fields["drain_delay_s"].default + fields["timeout_ms"].default / 1000
