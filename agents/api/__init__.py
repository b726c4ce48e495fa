"""The institution agent's local API: a server on a Unix socket (and optionally TCP on
127.0.0.1 with a token) and the optional application bus (`appbus`), both in front of one
`RoundScheduler` over a `RoundService`. See `zerosum.wire` for the frames."""

from agents.api.scheduler import RoundScheduler
from agents.api.server import ApiServer, ApiSettings
from agents.api.service import Delivery, Refused, RoundRequest, RoundService

__all__ = ["ApiServer", "ApiSettings", "Delivery", "Refused", "RoundRequest", "RoundScheduler",
           "RoundService"]
