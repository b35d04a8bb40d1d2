"""The SNS sink: each event published to an Amazon SNS topic (aiobotocore, the ``aws``
extra: ``pip install 'hivemem[aws]'``).

One ``Publish`` per event: ``Message`` is the event as JSON
(:func:`~hivemem.bridges.base.event_body`), with the string message attributes
``event_id`` (the same on every redelivery: subscribers drop repeats by it),
``event_type`` and ``namespace`` (which subscription filter policies can select on).
On a FIFO topic (its ARN ends in ``.fifo``) the event id is also the
``MessageDeduplicationId``, so SNS itself drops a redelivery within its 5-minute
deduplication window, and ``MessageGroupId`` is the event's namespace (order is kept per
namespace) unless a group id is given. Ids longer than SNS's 128 characters are replaced
by their SHA-256 in hex.

Credentials and region come from the usual AWS sources (environment, profile, instance or
task role); the region defaults to the topic ARN's. The permission needed is
``sns:Publish`` on the topic (and ``kms:GenerateDataKey`` and ``kms:Decrypt`` on its key
for an encrypted topic). botocore's own retries are off: the bridge retries (one retry
mechanism). Throttling, 5xx answers, timeouts and connection errors are tried again; other
refusals (a missing topic, a denied permission, an oversized message) are permanent and
the event goes to the dead-letter file.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
from typing import Any

from hivemem.bridges.base import DeliveryFailed, Message, Sink, Undeliverable
from hivemem.errors import InvalidInput

__all__ = ["RETRYABLE_CODES", "SnsSink"]

#: Error codes of refusals that are tried again (throttling, passing faults).
RETRYABLE_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "TooManyRequestsException",
        "KMSThrottling",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
#: The longest MessageGroupId and MessageDeduplicationId SNS accepts (characters).
_FIFO_ID_CHARS = 128


def _fifo_id(value: str) -> str:
    return value if len(value) <= _FIFO_ID_CHARS else hashlib.sha256(value.encode()).hexdigest()


class SnsSink(Sink):
    """Publishes each event to the SNS topic ``topic_arn`` (see the module notes).

    Args:
        topic_arn: ``arn:aws:sns:<region>:<account>:<name>``.
        region: the AWS region; default: the ARN's.
        endpoint_url: another endpoint (a local server such as moto or LocalStack).
        timeout_seconds: the most connecting, and then reading the answer, may take each
            (> 0).
        group_id: the MessageGroupId on a FIFO topic (default: the event's namespace).

    Raises:
        InvalidInput: a malformed ARN (field ``topic``) or timeout (field ``timeout``).
    """

    kind = "sns"

    def __init__(
        self,
        topic_arn: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout_seconds: float = 10.0,
        group_id: str | None = None,
    ) -> None:
        parts = topic_arn.split(":")
        if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sns" or not parts[5]:
            raise InvalidInput(
                f"expected a topic ARN arn:aws:sns:<region>:<account>:<name>, not {topic_arn!r}",
                field="topic",
            )
        if not timeout_seconds > 0:
            raise InvalidInput("timeout must be more than 0 seconds", field="timeout")
        self.topic_arn = topic_arn
        self.region = region or parts[3] or None
        self.endpoint_url = endpoint_url
        self.timeout_seconds = float(timeout_seconds)
        self.group_id = group_id
        self.fifo = topic_arn.endswith(".fifo")
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._client_error: type[Exception] = Exception
        self._boto_error: type[Exception] = Exception

    @property
    def target(self) -> str:
        return self.topic_arn

    async def open(self) -> None:
        """Create the SNS client.

        Raises:
            InvalidInput: aiobotocore is not installed, or no AWS credentials were found
                (field ``topic``).
        """
        try:
            session_module = importlib.import_module("aiobotocore.session")
            config_module = importlib.import_module("aiobotocore.config")
            exceptions = importlib.import_module("botocore.exceptions")
        except ImportError:
            raise InvalidInput(
                "the SNS bridge needs aiobotocore: pip install 'hivemem[aws]'", field="topic"
            ) from None
        self._client_error = exceptions.ClientError
        self._boto_error = exceptions.BotoCoreError
        session = session_module.get_session()
        if await session.get_credentials() is None:
            raise InvalidInput(
                "no AWS credentials found (environment, profile or role)", field="topic"
            )
        config = config_module.AioConfig(
            connect_timeout=self.timeout_seconds,
            read_timeout=self.timeout_seconds,
            retries={"max_attempts": 0, "mode": "standard"},
        )
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            session.create_client(
                "sns", region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )
        )
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack = self._stack, None
        self._client = None
        if stack is not None:
            await stack.aclose()

    def _request(self, message: Message) -> dict[str, Any]:
        event = message.event
        attributes = {
            "event_id": {"DataType": "String", "StringValue": message.id},
            "event_type": {"DataType": "String", "StringValue": event.type},
            "namespace": {"DataType": "String", "StringValue": event.namespace},
        }
        request: dict[str, Any] = {
            "TopicArn": self.topic_arn,
            "Message": message.body.decode("utf-8"),
            "MessageAttributes": attributes,
        }
        if self.fifo:
            request["MessageGroupId"] = _fifo_id(self.group_id or event.namespace)
            request["MessageDeduplicationId"] = _fifo_id(message.id)
        return request

    async def send(self, message: Message) -> None:
        """Publish one event.

        Raises:
            DeliveryFailed: throttling, a 5xx answer, a timeout or a connection error.
            Undeliverable: any other refusal.
        """
        client = self._client
        assert client is not None, "open() first"
        try:
            await client.publish(**self._request(message))
        except self._client_error as exc:
            response: dict[str, Any] = getattr(exc, "response", {})
            code = str(response.get("Error", {}).get("Code", ""))
            status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            what = f"{self.topic_arn}: {exc}"
            if status >= 500 or code in RETRYABLE_CODES:
                raise DeliveryFailed(what) from None
            raise Undeliverable(what) from None
        except self._boto_error as exc:
            raise DeliveryFailed(f"{self.topic_arn}: {type(exc).__name__}: {exc}") from None
