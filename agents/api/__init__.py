"""The institution agent's local API: a server on a Unix socket (and optionally TCP on
127.0.0.1 with a token) in front of a `RoundService`. See `zerosum.wire` for the frames."""

from agents.api.server import ApiServer, ApiSettings
from agents.api.service import Delivery, Refused, RoundRequest, RoundService

__all__ = ["ApiServer", "ApiSettings", "Delivery", "Refused", "RoundRequest", "RoundService"]
