"""Bounded retries of store operations: one policy for every write and for opening a store.

Which failures another attempt may cure is named once, in RETRYABLE; the attempts and the waits
between them are tenacity's. When the last attempt fails, or an attempt fails in a way no retry
cures, the caller gets StoreUnavailable with its own message: the service answers 503, a command
prints one line. A constraint violation is the caller's data, not the store, and passes through.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
import tenacity

from common.text import first_line

T = TypeVar("T")

# The failures after which an operation is tried again, because the next attempt may succeed.
RETRYABLE: tuple[type[BaseException], ...] = (
    # The database cannot take the operation now: a SQLite file still locked after the busy timeout
    # (a writer that gets no turn of common.sqlite_writer.WriterLock fails the same way), or a
    # PostgreSQL server that is down, restarting or out of connections, a connection lost midway, a
    # deadlock or serialization failure. A write that failed like this was rolled back.
    sa.exc.OperationalError,
    # The driver found its connection closed or broken; the next attempt opens another.
    sa.exc.InterfaceError,
    # Every connection of the engine's pool is in use; one may be free by the next attempt.
    sa.exc.TimeoutError,
    # The writer lock's side file could not be opened or locked, e.g. while the process is out of
    # file descriptors.
    OSError,
)


class StoreUnavailable(RuntimeError):
    """The store could not be reached or written, after bounded retries where a retry could help."""


def call_with_retries(work: Callable[[int], T], *, retries: int, wait: tenacity.wait.wait_base, failure: str) -> T:
    """Run `work` until an attempt succeeds, trying again after the failures in RETRYABLE.

    Args:
        work: one attempt; it gets the attempt's number, 1 for the first, so that an attempt that
            follows a failed one can look for what that one did (e.g. rows it committed although
            the acknowledgement of the commit was lost).
        retries: further attempts after the first.
        wait: the wait before each further attempt, e.g. `tenacity.wait_exponential(multiplier=0.05)`.
        failure: the start of StoreUnavailable's message; ": " and the last error's first line follow.

    Returns:
        What the successful attempt returned.

    Raises:
        sqlalchemy.exc.IntegrityError: an attempt broke a constraint (not retried).
        StoreUnavailable: every attempt failed with an error in RETRYABLE, or one failed with any
            other SQLAlchemy error, which another attempt would not cure.
        Exception: any other error of `work`, as it is, at once.
    """
    try:
        # Nearly every call succeeds at once, and setting tenacity up costs a sizeable share of a
        # single-row insert: so the first attempt runs without it, and only a failed one starts it.
        try:
            return work(1)
        except RETRYABLE as exc:
            if retries < 1:
                raise
            first_failure = exc
        numbers = itertools.count(1)

        def attempt() -> T:
            number = next(numbers)
            if number == 1:
                raise first_failure  # the attempt made above: tenacity counts it and waits after it
            return work(number)

        return tenacity.Retrying(stop=tenacity.stop_after_attempt(retries + 1), wait=wait,
                                 retry=tenacity.retry_if_exception_type(RETRYABLE), reraise=True)(attempt)
    except sa.exc.IntegrityError:
        raise
    except (*RETRYABLE, sa.exc.SQLAlchemyError) as exc:
        raise StoreUnavailable(f"{failure}: {first_line(exc)}") from None
