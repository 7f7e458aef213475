"""The exceptions sluicegate raises, one hierarchy rooted at :class:`Error`.

Errors about an argument also derive from the built-in they resemble, so ``except
sluicegate.Error`` and ``except ValueError`` (or ``TypeError``, ``OverflowError``) both catch
them. The native module raises these very classes. Each says it lives in ``sluicegate``, where
users import it from, so exceptions pickle and cross process boundaries (multiprocessing,
``concurrent.futures``) as themselves.
"""

from typing import Optional


class Error(Exception):
    """Base of every sluicegate error."""


class ArgumentError(Error, ValueError):
    """An argument's value is out of range, or names nothing known (a policy, dialect, metric...)."""


class ArgumentTypeError(Error, TypeError):
    """An argument of the wrong type, or a keyword the call does not take."""


class ArgumentOverflowError(ArgumentError, OverflowError):
    """A count too large: 2**64 and up (2**32 for capacities, quotas and ``n`` of a quota)."""


class PolicyError(ArgumentError):
    """The policy, a capacity or an override is unusable; the message names the parameter."""


class InvalidKeyError(ArgumentError):
    """An account or model key is empty, or longer than 64 (account) / 128 (model) bytes."""


class SpendLimitAboveTierError(ArgumentError):
    """Users may lower their spend limit within their tier, never raise it above the tier's."""


class InvalidUsageError(ArgumentError):
    """Usage reported at settle is impossible (cached above prompt tokens, or too large)."""


class CorruptSnapshotError(ArgumentError):
    """A snapshot is truncated, damaged, foreign, or from an engine of other capacities."""


class SharedRegionError(Error):
    """A shared engine (``shared=``) could not be opened: the file was made with another policy
    or capacity, is damaged, is not a sluicegate region, or the operating system refused it.
    The file is left as it was."""


class RedisError(Error):
    """A replica's engine (``redis=``) could not start: Redis did not answer within its timeout,
    refused, answered an error, or answered what sluicegate's functions would not."""


class EngineInUseError(Error):
    """A restore of a shared engine while another process (or engine object) has it open."""


class UnknownAccountError(Error, LookupError):
    """No such account."""


class TableFullError(Error):
    """A fixed-capacity table has no room for this key; existing keys keep working."""


class QuotaExceededError(Error):
    """A quota acquisition past its limit, a release beyond what is held, or a limit below use."""

    used: int
    limit: Optional[int]


class AlreadySettledError(Error):
    """The permit was already settled or cancelled; nothing changed."""


class StalePermitError(Error):
    """The permit's scope was reclaimed, or the engine restored, since it was issued."""


class PermitExpiredError(Error):
    """The permit was not settled within the policy's ``permit_ttl`` (default 15 minutes).

    Its reservation stays charged as if fully used, and what it held (its scope's in-flight
    count, its model's tracked load) has been released; settling, cancelling or charging it
    again raises this error again and changes nothing.
    """


ERRORS = (
    Error,
    ArgumentError,
    ArgumentTypeError,
    ArgumentOverflowError,
    PolicyError,
    InvalidKeyError,
    SpendLimitAboveTierError,
    InvalidUsageError,
    CorruptSnapshotError,
    UnknownAccountError,
    TableFullError,
    QuotaExceededError,
    AlreadySettledError,
    StalePermitError,
    PermitExpiredError,
    SharedRegionError,
    RedisError,
    EngineInUseError,
)
"""Every sluicegate exception class."""

for _cls in ERRORS:
    _cls.__module__ = "sluicegate"
