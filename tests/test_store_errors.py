"""A typed error that crosses the engine's queue as (message, code) comes back as the same type, so the
client sees NOT_FOUND for a delta deleted between admission and load, not INTERNAL."""
import pytest

from delta_store import errors


@pytest.mark.parametrize("cls", [errors.InvalidArgument, errors.FailedPrecondition, errors.NotFound,
                                 errors.AlreadyExists, errors.ResourceExhausted, errors.Unauthenticated,
                                 errors.PermissionDenied, errors.DeadlineExceeded, errors.Cancelled,
                                 errors.CorruptBlob, errors.Unavailable])
def test_error_for_code_round_trips_every_code(cls):
    err = errors.error_for_code(cls.code, "delta x@1 not found")
    assert err.code == cls.code and str(err) == "delta x@1 not found"


@pytest.mark.parametrize("code", [None, "", "BOGUS"])
def test_unknown_code_is_internal(code):
    err = errors.error_for_code(code, "boom")
    assert err.code == "INTERNAL" and str(err) == "boom"


def test_subclasses_keep_their_parent_code():
    assert errors.error_for_code(errors.DeltaError.code, "m").code == "INVALID_ARGUMENT"
    assert errors.error_for_code(errors.BaseMismatch.code, "m").code == "FAILED_PRECONDITION"
