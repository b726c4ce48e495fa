"""The consortium's admin step on a secured Kafka: SCRAM users, ACLs and topics per party.

Each party may READ its own inbox and its own consumer group, and WRITE every other party's
inbox (the coordinator also its own: it seals its receipts there). Nothing else: no READ of
another inbox, no WRITE to its own, no CREATE. The auditor reads every inbox and writes none.
Topics are created here, by the admin, with the audit settings.

aiokafka's admin client has no ACL or SCRAM calls, so these go through kafka-python (>= 3),
whose blocking client runs in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.config import Consortium, topic_for
from agents.security import (
    AUDITOR,
    KafkaAccess,
    SecurityError,
    read_credentials,
    scram_username,
)


class AdminError(Exception):
    """The broker refused an admin request; the message names the request and the reason."""


@dataclass(frozen=True)
class Grant:
    """One ALLOW ACL: `principal` may do `operation` on the literal topic or group `name`."""

    principal: str
    resource: str  # "topic" | "group"
    name: str
    operation: str  # "READ" | "WRITE" | "DESCRIBE"


def group_for(consortium: str, party: str) -> str:
    """The consumer group an agent commits its offsets in (see Agent.run)."""
    return f"zerosum.{consortium}.{party}"


def party_grants(consortium: Consortium, party: str) -> list[Grant]:
    """What `party` may do: read its inbox and group, write the other inboxes."""
    user = f"User:{scram_username(consortium.id, party)}"
    own = topic_for(consortium.id, party)
    grants = [Grant(user, "topic", own, op) for op in ("READ", "DESCRIBE")]
    grants += [Grant(user, "group", group_for(consortium.id, party), op)
               for op in ("READ", "DESCRIBE")]
    for other in consortium.registry:
        if other != party or party == consortium.coordinator:  # the coordinator's receipts
            grants.append(Grant(user, "topic", topic_for(consortium.id, other), "WRITE"))
            if other != party:
                grants.append(Grant(user, "topic", topic_for(consortium.id, other),
                                    "DESCRIBE"))
    return grants


def auditor_grants(consortium: Consortium) -> list[Grant]:
    """The auditor reads every inbox of the consortium and writes none."""
    user = f"User:{scram_username(consortium.id, AUDITOR)}"
    return [Grant(user, "topic", topic_for(consortium.id, p), op)
            for p in consortium.registry for op in ("READ", "DESCRIBE")]


def credential_path(consortium: Consortium, party: str) -> Path:
    """Where `zerosum init` writes a party's (or the auditor's) SCRAM credential."""
    return consortium.path.parent / "keys" / f"{party}.kafka"


def _acl(grant: Grant) -> Any:
    from kafka.admin import (
        ACL,
        ACLOperation,
        ACLPermissionType,
        ACLResourcePatternType,
        ResourcePattern,
        ResourceType,
    )

    rtype = ResourceType.TOPIC if grant.resource == "topic" else ResourceType.GROUP
    return ACL(grant.principal, "*", ACLOperation[grant.operation], ACLPermissionType.ALLOW,
               ResourcePattern(rtype, grant.name, ACLResourcePatternType.LITERAL))


class KafkaAdmin:
    """kafka-python's KafkaAdminClient as the admin super-user; blocking, use `with`.

    Called from asyncio code through `asyncio.to_thread` (see `provision_async`)."""

    def __init__(self, access: KafkaAccess) -> None:
        from kafka.admin import KafkaAdminClient

        self.access = access
        self._client: Any = KafkaAdminClient(**access.kafka_python_kwargs(),
                                             client_id="zerosum-admin", request_timeout_ms=30_000)

    def __enter__(self) -> KafkaAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def create_topics(self, topics: list[str]) -> list[str]:
        """Create the missing inbox topics with the audit settings; return those created."""
        from kafka.errors import TopicAlreadyExistsError

        from agents.kafka_bus import topic_settings

        partitions, wanted, configs = topic_settings()
        existing = set(self._client.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:  # as many replicas as topics.properties asks, and the cluster has brokers
            replication = min(wanted, len(self._client.describe_cluster()["brokers"]))
            with contextlib.suppress(TopicAlreadyExistsError):  # another admin was first
                self._client.create_topics(
                    {t: {"num_partitions": partitions, "replication_factor": replication,
                         "configs": configs} for t in missing}, wait_for_metadata=True)
        return missing

    def upsert_user(self, username: str, password: str) -> None:
        from kafka.admin import ScramMechanism, UserScramCredentialUpsertion

        up = UserScramCredentialUpsertion(username, ScramMechanism.SCRAM_SHA_512, password)
        result = self._client.alter_user_scram_credentials([up])
        if result.get(username):
            raise AdminError(f"SCRAM credential for {username}: {result[username]}")

    def delete_user(self, username: str) -> None:
        from kafka.admin import ScramMechanism, UserScramCredentialDeletion

        gone = UserScramCredentialDeletion(username, ScramMechanism.SCRAM_SHA_512)
        error = self._client.alter_user_scram_credentials([gone]).get(username)
        if error:
            raise AdminError(f"deleting SCRAM credential of {username}: {error}")

    def grant(self, grants: Iterable[Grant]) -> None:
        acls = [_acl(g) for g in grants]
        if acls:
            failed = self._client.create_acls(acls).get("failed", [])
            if failed:
                raise AdminError(f"creating ACLs failed: {failed!r}")

    def revoke_principal(self, principal: str) -> int:
        """Delete every ACL of `principal`; return how many were deleted."""
        from kafka.admin import (
            ACLFilter,
            ACLOperation,
            ACLPermissionType,
            ACLResourcePatternType,
            ResourcePatternFilter,
            ResourceType,
        )

        filt = ACLFilter(principal, None, ACLOperation.ANY, ACLPermissionType.ANY,
                         ResourcePatternFilter(ResourceType.ANY, None,
                                               ACLResourcePatternType.ANY))
        deleted = 0
        for _filter, acls, error_type in self._client.delete_acls([filt]):
            if error_type.errno != 0:  # kafka-python's error class; NoError is 0
                raise AdminError(f"deleting the ACLs of {principal}: {error_type.__name__}")
            deleted += len(acls)
        return deleted


def provision(admin: KafkaAccess, consortium: Consortium,
              parties: Iterable[str] | None = None, *, auditor: bool = True,
              users: bool = True) -> list[str]:
    """Create (or update) the topics, SCRAM users and ACLs of `parties` (default: all).

    Idempotent: run it again after adding a party to consortium.toml; the broker and the
    running parties carry on. `users=False` leaves SCRAM users to the cluster's own team (an
    existing cluster). Returns the topics it created. Blocking (`provision_async`)."""
    names = list(consortium.registry) if parties is None else list(parties)
    unknown = sorted(set(names) - set(consortium.registry))
    if unknown:
        raise AdminError(f"not in {consortium.path}: {', '.join(unknown)}")
    with KafkaAdmin(admin) as client:
        created = client.create_topics([topic_for(consortium.id, p) for p in consortium.registry])
        for party in names:
            if users:
                client.upsert_user(*_party_credential(consortium, party))
            client.grant(party_grants(consortium, party))
        if auditor:
            if users:
                client.upsert_user(*_party_credential(consortium, AUDITOR))
            client.grant(auditor_grants(consortium))
    return created


async def provision_async(admin: KafkaAccess, consortium: Consortium,
                          parties: Iterable[str] | None = None) -> list[str]:
    return await asyncio.to_thread(provision, admin, consortium, parties)


def revoke(admin: KafkaAccess, consortium_id: str, party: str, *, user: bool = True) -> int:
    """Take a party out: its ACLs first (refused from its very next request), then its SCRAM
    user (no new connection). Its topic stays, for the audit. Returns the ACLs deleted."""
    with KafkaAdmin(admin) as client:
        deleted = client.revoke_principal(f"User:{scram_username(consortium_id, party)}")
        if user:
            client.delete_user(scram_username(consortium_id, party))
    return deleted


def _party_credential(consortium: Consortium, party: str) -> tuple[str, str]:
    user, password = read_credentials(credential_path(consortium, party))
    if user != scram_username(consortium.id, party):
        raise SecurityError(f"{credential_path(consortium, party)}: username {user!r} is not "
                            f"{scram_username(consortium.id, party)!r}")
    return user, password


def init_on_broker(directory: Path, access: KafkaAccess, **init: Any) -> list[Path]:
    """`zerosum init` for the broker `access` reaches as its admin, then the admin step: the
    consortium trusts that broker's CA, and (secured broker) gets its topics, users, ACLs.
    For the demo, the bench and the tests, where one person is admin and every party."""
    from agents.config import load_consortium
    from agents.init import init_consortium

    files = init_consortium(directory, bootstrap=access.bootstrap, ca=access.cafile,
                            insecure=not access.secure, **init)
    if access.secure:
        provision(access, load_consortium(directory / "consortium.toml"))
    return files
