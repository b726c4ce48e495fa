"""zerosum's public client: ask the local institution agent for rounds and their results.

    from zerosum import Client

    async with Client(path_of_the_agents_socket) as c:
        result = await c.round(customer_ids, scope="query")
        async for event in c.results():
            ...
"""

from zerosum.client import Client
from zerosum.errors import (
    ApiError,
    ConnectionLost,
    RequestRefused,
    RoundAborted,
    SubscriptionLagged,
)
from zerosum.results import Delivery, RoundResult, Row
from zerosum.wire import ErrorCode, Role

__all__ = [
    "ApiError",
    "Client",
    "ConnectionLost",
    "Delivery",
    "ErrorCode",
    "RequestRefused",
    "Role",
    "RoundAborted",
    "RoundResult",
    "Row",
    "SubscriptionLagged",
]
