"""Bad input raises a clear, typed error and never crashes or corrupts state."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sluicegate

COUNT_ARGS = ("prompt_tokens", "cached_tokens", "max_tokens", "n", "expected_tokens", "now_ns")


def state(e):
    return e.remaining("a", "m", now_ns=0), e.limits("a", "m", now_ns=0)


@pytest.fixture(scope="module")
def engine():
    return sluicegate.Engine(policy="fixed", capacity=100)


@settings(max_examples=200, deadline=None)
@given(
    arg=st.sampled_from(COUNT_ARGS),
    value=st.one_of(
        st.integers(max_value=-1),
        st.integers(min_value=2**64, max_value=2**80),
        st.floats(allow_nan=True),
        st.text(max_size=3),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    ),
)
def test_bad_counts_raise_type_value_or_overflow_errors(engine, arg, value):
    before = state(engine)
    with pytest.raises((TypeError, ValueError, OverflowError)) as err:
        engine.admit("a", "m", now_ns=0, **{arg: value})
    assert arg in str(err.value)
    assert state(engine) == before


def test_negative_numbers_are_value_errors_and_huge_ones_overflow(engine):
    with pytest.raises(ValueError, match="prompt_tokens must not be negative"):
        engine.admit("a", "m", prompt_tokens=-1)
    with pytest.raises(OverflowError, match="below 2\\*\\*64"):
        engine.admit("a", "m", prompt_tokens=2**64)
    with pytest.raises(TypeError, match="must be an int, not float"):
        engine.admit("a", "m", prompt_tokens=1.0)


@settings(max_examples=100, deadline=None)
@given(account=st.one_of(st.integers(), st.none(), st.floats(), st.lists(st.text())))
def test_keys_must_be_str_or_bytes(engine, account):
    with pytest.raises(TypeError, match="account must be str or bytes"):
        engine.admit(account, "m")


def test_empty_and_long_keys_are_typed_errors(engine):
    with pytest.raises(sluicegate.InvalidKeyError):
        engine.admit("", "m")
    with pytest.raises(sluicegate.InvalidKeyError):
        engine.admit("x" * 65, "m")
    with pytest.raises(sluicegate.InvalidKeyError):
        engine.admit("a", b"m" * 129)
    assert engine.admit(b"\xff\x00bytes", "m", now_ns=0).admitted


def test_invalid_requests_are_decisions_not_exceptions(engine):
    zero = engine.admit("a", "m", n=0, now_ns=0)
    assert (zero.outcome, zero.status_code) == (sluicegate.Outcome.REJECT_INVALID, 400)
    assert zero.error_body()["error"]["type"] == "invalid_request"
    cached = engine.admit("a", "m", prompt_tokens=5, cached_tokens=6, now_ns=0)
    assert cached.outcome is sluicegate.Outcome.REJECT_INVALID


def test_bad_policies_dialects_and_names(engine):
    with pytest.raises(ValueError, match="policy must be one of"):
        sluicegate.Engine(policy="nope")
    with pytest.raises(TypeError, match="unexpected keyword"):
        sluicegate.Engine(policy="fixed", requests_per_hour=5)
    with pytest.raises(sluicegate.PolicyError, match="hard_factor"):
        sluicegate.Engine(hard_factor=0.5)
    with pytest.raises(sluicegate.PolicyError, match="hard_factor"):
        sluicegate.Engine(hard_factor=float("nan"))
    with pytest.raises(sluicegate.PolicyError):
        sluicegate.Engine(capacity=0)
    d = engine.admit("a", "m", now_ns=0)
    with pytest.raises(ValueError, match="dialect must be one of"):
        d.headers("klingon")
    with pytest.raises(ValueError, match="completion must be one of"):
        engine.settle(d, completion="maybe")
    with pytest.raises(ValueError, match="quota must be one of"):
        engine.acquire_quota("a", "tpus")
    with pytest.raises(ValueError, match="load"):
        engine.set_load("m", -1.0)


def test_a_full_table_is_a_typed_error_and_existing_keys_keep_working():
    e = sluicegate.Engine(policy="fixed", capacity=4, accounts=64)
    for i in range(4):
        e.admit(f"acct-{i}", "m", now_ns=0)
    with pytest.raises(sluicegate.TableFullError):
        for i in range(4, 64):
            e.admit(f"acct-{i}", "m", now_ns=0)
    assert e.admit("acct-0", "m", now_ns=0).admitted


def test_all_errors_share_one_root():
    for name in (
        "ArgumentError",
        "ArgumentTypeError",
        "ArgumentOverflowError",
        "PermitExpiredError",
        "PolicyError",
        "TableFullError",
        "InvalidKeyError",
        "UnknownAccountError",
        "SpendLimitAboveTierError",
        "QuotaExceededError",
        "AlreadySettledError",
        "StalePermitError",
        "InvalidUsageError",
        "CorruptSnapshotError",
    ):
        assert issubclass(getattr(sluicegate, name), sluicegate.Error)
