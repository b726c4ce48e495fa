"""Request frames into `RoundRequest`s (checked against the consortium's floors), and
`Delivery`s into frame bodies. Totals go out as decimal strings at each attribute's scale
(`protocol.fixedpoint.format_decimal`), the same text `zerosum round` writes."""

from __future__ import annotations

import math
import re
from typing import Any

from agents.api.service import Delivery, Refused, RoundRequest
from protocol.fixedpoint import format_decimal
from protocol.machine import Ended, Outcome
from protocol.messages import Scope
from protocol.policy import ConsortiumPolicy
from zerosum.wire import ROLE_ORDER, ErrorCode, encode_json

MAX_ID_CHARS = 256
MAX_DEADLINE_S = 86_400  # a round that runs longer holds a slot of max_in_flight as long
_UNUSABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")


def _strings(frame: dict[str, Any], key: str) -> tuple[str, ...] | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise Refused(ErrorCode.INVALID_FIELD, f"{key} must be a list of non-empty strings",
                      key)
    return tuple(value)


def parse_round(frame: dict[str, Any], policy: ConsortiumPolicy) -> RoundRequest:
    """A `round` frame as a request within `policy`; `Refused` naming the field otherwise."""
    ids = _strings(frame, "customer_ids")
    if not ids:
        raise Refused(ErrorCode.INVALID_FIELD, "customer_ids must list at least one customer",
                      "customer_ids")
    if len(ids) > policy.max_query:
        raise Refused(ErrorCode.QUERY_TOO_LARGE, f"a query of {len(ids)} customers exceeds "
                      f"the consortium's max_query of {policy.max_query}", "customer_ids")
    if max(map(len, ids)) > MAX_ID_CHARS:
        raise Refused(ErrorCode.INVALID_FIELD, f"a customer id of {max(map(len, ids))} "
                      f"characters (at most {MAX_ID_CHARS})", "customer_ids")
    if bad := _UNUSABLE.search("".join(ids)):  # one pass in C, whatever the query's size
        raise Refused(ErrorCode.INVALID_FIELD, f"a customer id holds {bad.group()!r}: a "
                      "control character or a lone surrogate", "customer_ids")
    try:
        scope = Scope(frame.get("scope", Scope.INTERSECTION.value))
    except ValueError:
        raise Refused(ErrorCode.INVALID_FIELD, "scope must be one of "
                      f"{', '.join(s.value for s in Scope)}", "scope") from None
    attributes = _strings(frame, "attributes") or tuple(policy.attributes)
    if unknown := [a for a in attributes if a not in policy.attributes]:
        raise Refused(ErrorCode.UNKNOWN_ATTRIBUTE, f"attribute {unknown[0]!r} is not one of "
                      f"{', '.join(policy.attributes)}", "attributes")
    if len(set(attributes)) != len(attributes):
        raise Refused(ErrorCode.INVALID_FIELD, "an attribute is named twice", "attributes")
    participants = _strings(frame, "participants") or tuple(sorted(policy.institutions))
    if len(set(participants)) != len(participants):
        raise Refused(ErrorCode.INVALID_FIELD, "an institution is named twice",
                      "participants")
    if unknown := [p for p in participants if p not in policy.institutions]:
        raise Refused(ErrorCode.UNKNOWN_PARTICIPANT,
                      f"{unknown[0]!r} is not an institution of the consortium", "participants")
    if problem := policy.problem(participants, policy.min_holders, 0):
        raise Refused(ErrorCode.BELOW_FLOOR, problem, "participants")
    min_holders = frame.get("min_holders", policy.min_holders)
    if not isinstance(min_holders, int) or isinstance(min_holders, bool):
        raise Refused(ErrorCode.INVALID_FIELD, "min_holders must be an integer", "min_holders")
    if min_holders < policy.min_holders:
        raise Refused(ErrorCode.BELOW_FLOOR, f"min_holders {min_holders} is below the "
                      f"consortium's floor of {policy.min_holders}", "min_holders")
    if min_holders > len(participants):
        raise Refused(ErrorCode.INVALID_FIELD, f"min_holders {min_holders} is more than the "
                      f"{len(participants)} participants", "min_holders")
    deadline = frame.get("deadline_s")
    if deadline is not None and (isinstance(deadline, bool)
                                 or not isinstance(deadline, int | float)
                                 or not math.isfinite(deadline) or deadline <= 0
                                 or deadline > MAX_DEADLINE_S):
        raise Refused(ErrorCode.INVALID_FIELD, "deadline_s must be a positive number of "
                      f"seconds, at most {MAX_DEADLINE_S}", "deadline_s")
    return RoundRequest(ids, scope, attributes, min_holders, participants,
                        None if deadline is None else float(deadline))


def outcome_json(result: Outcome | Ended) -> dict[str, Any]:
    """A round's end as JSON values, without its rows: status, then the abort's reason,
    detail and culprits, or the withheld count and the attributes with their scales."""
    if isinstance(result, Ended):
        return {"status": "aborted", "reason": result.reason.name, "detail": result.detail,
                "culprits": list(result.culprits)}
    return {"status": "published", "withheld": result.withheld, "rows": int(result.tokens.size),
            "attributes": [[a.name, a.scale] for a in result.attributes]}


def delivery_body(d: Delivery) -> dict[str, Any]:
    """A delivery as JSON values: `outcome_json` (status, reason or withheld and attributes)
    plus the round id, the roles and, when published, `table`: one row per customer,
    `[customer_id or null, token (hex), holders, total...]`, totals as decimal strings."""
    body = {"round_id": d.round_id.hex(), "roles": [r.value for r in ROLE_ORDER
                                                     if r in d.roles],
            **outcome_json(d.result)}
    o = d.result
    if isinstance(o, Outcome):
        names = d.customer_ids
        scales = [a.scale for a in o.attributes]
        body["table"] = [
            [names[i] if names is not None else None, bytes(tok).hex(), row[0],
             *(format_decimal(v, s) for v, s in zip(row[1:], scales, strict=True))]
            for i, (tok, row) in enumerate(zip(o.tokens, o.totals.tolist(), strict=True))]
    return body


def delivery_json(d: Delivery) -> bytes:
    """`delivery_body` as JSON: for a large round, seconds of work (the server runs it in a
    thread)."""
    return encode_json(delivery_body(d))
