"""The SDK applications use: ``await Producer().send(mail)``.

The path is deliberately short: validate, insert into MongoDB (status ``queued``), put
only the id on the tube. MongoDB comes first so a mail is never queued without its
document; if the put then fails the document stays ``queued`` and the requeue sweep
(``mailer requeue`` or the consumer's own) finds it, so the mail is not lost either.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from mailer.beanstalk import Beanstalk
from mailer.config import Settings, load_settings
from mailer.errors import (
    BeanstalkConnectionError,
    BeanstalkError,
    BeanstalkServerError,
    BeanstalkTimeoutError,
    EmailValidationError,
    EnqueueError,
    ProducerClosedError,
    StoreError,
)
from mailer.models import Email, MailRecord, parse_email
from mailer.store import Doc, MailStore
from mailer.throughput import ThroughputMeter

log = logging.getLogger("mailer.producer")
EmailInput = Email | dict[str, Any] | str | bytes


class Producer:
    """Validates, stores and queues mails. Safe to share between many tasks.

    >>> async with Producer() as producer:
    ...     mail_id = await producer.send({"from": "a@example.com", "to": "b@example.com",
    ...                                     "subject": "Hi", "text": "Hello"})
    """

    def __init__(self, settings: Settings | None = None, *, test: bool = False) -> None:
        settings = settings if settings is not None else load_settings()
        self.settings = settings.for_test() if test else settings
        b = self.settings.beanstalkd
        self.store = MailStore(self.settings)
        self.queue = Beanstalk(
            b.host, b.port, connect_timeout=b.connect_timeout_s, command_timeout=b.command_timeout_s
        )
        self._meter = ThroughputMeter("Producer", self.settings.throughput_interval_s)
        self._reconnect_lock = asyncio.Lock()
        self._connected = False

    def __repr__(self) -> str:
        return f"<Producer tube={self.settings.beanstalkd.tube!r} connected={self._connected}>"

    # --- lifecycle ---------------------------------------------------------------------

    async def connect(self) -> None:
        if self._connected:
            return
        await self.store.connect()
        try:
            await self.queue.connect()
            await self.queue.use(self.settings.beanstalkd.tube)
        except BaseException:
            await self.store.close()
            raise
        if self.settings.measure_throughput:
            self._meter.start()
        self._connected = True

    async def quit(self) -> None:
        """Close both connections; calls in flight fail. Safe to call twice."""
        self._connected = False
        await self._meter.stop()
        await self.queue.close()
        await self.store.close()

    close = quit

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.quit()

    def _require(self) -> None:
        if not self._connected:
            raise ProducerClosedError(
                "the producer is not connected: call 'await producer.connect()' "
                "or use 'async with Producer()'"
            )

    # --- sending -----------------------------------------------------------------------

    def validate(self, email: EmailInput) -> Email:
        return parse_email(email, max_bytes=self.settings.producer.max_email_bytes)

    def _priority(self, email: Email) -> int:
        return email.priority if email.priority is not None else self.settings.producer.default_priority

    async def send(self, email: EmailInput) -> str:
        """Store and queue one mail; return its id (24 hex characters).

        A mail whose ``idempotency_key`` was used before returns the earlier id and queues
        nothing. Raises EmailValidationError (nothing stored), StoreError (nothing stored)
        or EnqueueError (stored, not yet queued: the requeue sweep will queue it).
        """
        self._require()
        mail = self.validate(email)
        doc = MailStore.new_document(mail, priority=self._priority(mail))
        try:
            mail_id, new = await self.store.insert(doc)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"MongoDB refused the mail, nothing was queued: {type(exc).__name__}: {exc}"
            ) from None
        if new:
            try:
                await self._put(mail_id.encode(), self._priority(mail), mail.delay_seconds())
            except BeanstalkError as exc:
                raise EnqueueError([mail_id], exc) from None
            self._meter.add()
        return mail_id

    async def send_many(self, emails: Sequence[EmailInput]) -> list[str]:
        """Store and queue a batch with one ``insert_many`` and pipelined puts.

        Every mail is validated first: one invalid mail rejects the whole batch (its error
        names the index, e.g. ``[3].to``) and nothing is stored.
        """
        self._require()
        mails: list[Email] = []
        errors: list[tuple[str, str]] = []
        for i, raw in enumerate(emails):
            try:
                mails.append(self.validate(raw))
            except EmailValidationError as exc:
                errors.extend((f"[{i}].{field}", msg) for field, msg in exc.errors)
        if errors:
            raise EmailValidationError(errors)
        docs: list[Doc] = [MailStore.new_document(m, priority=self._priority(m)) for m in mails]
        try:
            results = await self.store.insert_many(docs)
        except StoreError:
            raise
        except Exception as exc:
            raise StoreError(
                f"MongoDB refused the batch ({type(exc).__name__}: {exc}); mails before the failure "
                "may be stored and will be queued by the requeue sweep"
            ) from None
        # Group the new mails by (priority, delay) so each group is one pipelined write.
        groups: dict[tuple[int, int], list[str]] = {}
        for mail, (mail_id, new) in zip(mails, results, strict=True):
            if new:
                groups.setdefault((self._priority(mail), mail.delay_seconds()), []).append(mail_id)
        unqueued: list[str] = []
        cause: BaseException | None = None
        for (priority, delay), ids in groups.items():
            try:
                outcome = await self._put_many(ids, priority, delay)
            except BeanstalkError as exc:
                unqueued.extend(ids)
                cause = exc
                continue
            for mail_id, put in zip(ids, outcome, strict=True):
                if isinstance(put, BeanstalkServerError):
                    unqueued.append(mail_id)
                    cause = put
        if unqueued:
            assert cause is not None
            raise EnqueueError(unqueued, cause, all_ids=[mail_id for mail_id, _ in results])
        self._meter.add(sum(1 for _, new in results if new))
        return [mail_id for mail_id, _ in results]

    async def status(self, mail_id: str) -> MailRecord:
        """The stored record of a mail: status, attempts, vendor, message id."""
        self._require()
        return await self.store.get(mail_id)

    # --- the queue, with one reconnect ---------------------------------------------------

    async def _put(self, body: bytes, priority: int, delay: int) -> int:
        ttr = self.settings.beanstalkd.ttr_s
        try:
            return await self.queue.put(body, priority=priority, delay=delay, ttr=ttr)
        except (BeanstalkConnectionError, BeanstalkTimeoutError):
            await self._reconnect()
            return await self.queue.put(body, priority=priority, delay=delay, ttr=ttr)

    async def _put_many(self, ids: list[str], priority: int, delay: int) -> list[int | BeanstalkServerError]:
        ttr = self.settings.beanstalkd.ttr_s
        bodies = [i.encode() for i in ids]
        try:
            return await self.queue.put_many(bodies, priority=priority, delay=delay, ttr=ttr)
        except (BeanstalkConnectionError, BeanstalkTimeoutError):
            # Some of these may have been queued before the connection dropped; a second
            # job for a mail is harmless (the consumer's claim lets only one deliver).
            await self._reconnect()
            return await self.queue.put_many(bodies, priority=priority, delay=delay, ttr=ttr)

    async def _reconnect(self) -> None:
        """Reconnect once for every task that saw the same broken connection."""
        async with self._reconnect_lock:
            if not self.queue.connected:
                log.warning("beanstalkd connection lost; reconnecting")
                await self.queue.reconnect()
