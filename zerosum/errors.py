"""The client's exceptions: one base, `ApiError`, and one class per kind of failure."""

from __future__ import annotations


class ApiError(Exception):
    """Base of every error `zerosum.Client` raises on purpose."""


class ConnectionLost(ApiError):
    """The agent closed the connection (or stopped) before answering."""


class RequestRefused(ApiError):
    """The agent refused a request. `code` is one of `zerosum.wire.ErrorCode`'s values;
    `field` names the request field at fault, when there is one."""

    def __init__(self, code: str, detail: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {detail}" + (f" (field {field!r})" if field else ""))
        self.code = code
        self.detail = detail
        self.field = field


class RoundAborted(ApiError):
    """The round ended without a result. `reason` is the protocol's abort reason (its name,
    e.g. "TIMEOUT"); `culprits` the parties the aborting party blamed."""

    def __init__(self, round_id: str, reason: str, detail: str,
                 culprits: tuple[str, ...]) -> None:
        super().__init__(f"round {round_id} aborted: {reason}: {detail}")
        self.round_id = round_id
        self.reason = reason
        self.detail = detail
        self.culprits = culprits


class SubscriptionLagged(ApiError):
    """This subscriber fell too far behind; the agent ended its subscription after dropping
    `dropped` deliveries. Subscribe again to carry on."""

    def __init__(self, dropped: int) -> None:
        super().__init__(f"subscription ended: {dropped} deliveries dropped while behind")
        self.dropped = dropped
