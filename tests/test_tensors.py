"""headway.tensors: packing arrays into Tensor messages, reading them back, and the errors
a client gets for a malformed tensor."""

from __future__ import annotations

import re

import numpy as np
import pytest

from headway.errors import InvalidArgument
from headway.tensors import floats, from_tensor, is_set, to_tensor, to_tensor_bf16, tokens
from headway.v1 import common_pb2

WHAT = "data[2].datum.weights"


def raw(data: bytes, dtype: int, shape: list[int]) -> common_pb2.Tensor:
    return common_pb2.Tensor(data=data, dtype=dtype, shape=shape)


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    ("np_dtype", "wire"),
    [
        (np.float32, common_pb2.DTYPE_FLOAT32),
        (np.float64, common_pb2.DTYPE_FLOAT64),
        (np.float16, common_pb2.DTYPE_FLOAT16),
        (np.int32, common_pb2.DTYPE_INT32),
        (np.int64, common_pb2.DTYPE_INT64),
        (np.bool_, common_pb2.DTYPE_BOOL),
    ],
)
def test_numpy_dtype_round_trips_with_its_own_dtype(np_dtype, wire):
    # Negative, zero and positive values; for bool, alternating False / True.
    values = (np.arange(6).reshape(2, 3) - 2).astype(np_dtype)
    t = to_tensor(values)
    assert t.dtype == wire
    assert list(t.shape) == [2, 3]
    back = from_tensor(t, WHAT)
    assert back.dtype == np_dtype
    np.testing.assert_array_equal(back, values)


def test_packed_bytes_are_little_endian_row_major():
    t = to_tensor(np.array([[1, 2], [3, 4]], dtype=np.int32))
    assert t.data == b"\x01\0\0\0\x02\0\0\0\x03\0\0\0\x04\0\0\0"


def test_big_endian_array_is_packed_little_endian():
    values = np.array([1.5, -2.0], dtype=">f8")
    t = to_tensor(values)
    assert t.dtype == common_pb2.DTYPE_FLOAT64
    assert t.data == np.array([1.5, -2.0], dtype="<f8").tobytes()


def test_fortran_order_array_is_packed_in_c_order():
    values = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    t = to_tensor(values)
    assert t.data == np.arange(6, dtype="<i8").tobytes()
    np.testing.assert_array_equal(from_tensor(t, WHAT), values)


def test_scalar_has_empty_shape():
    t = to_tensor(np.float32(2.5))
    assert list(t.shape) == []
    assert from_tensor(t, WHAT).shape == ()
    assert float(from_tensor(t, WHAT)) == 2.5


def test_empty_array_has_shape_zero_and_no_data():
    t = to_tensor([], common_pb2.DTYPE_INT32)
    assert (t.dtype, list(t.shape), t.data) == (common_pb2.DTYPE_INT32, [0], b"")
    assert from_tensor(t, WHAT).shape == (0,)


def test_int_sequence_that_fits_int32_packs_as_int32():
    assert to_tensor([0, 5, 2**31 - 1, -(2**31)]).dtype == common_pb2.DTYPE_INT32


def test_int_sequence_beyond_int32_packs_as_int64():
    t = to_tensor([1, 2**31])
    assert t.dtype == common_pb2.DTYPE_INT64
    assert from_tensor(t, WHAT).tolist() == [1, 2**31]


def test_int64_array_keeps_int64_even_when_values_fit_int32():
    assert to_tensor(np.array([1, 2], dtype=np.int64)).dtype == common_pb2.DTYPE_INT64


def test_float_sequence_packs_as_float32():
    t = to_tensor([0.5, -1.25])
    assert t.dtype == common_pb2.DTYPE_FLOAT32
    assert from_tensor(t, WHAT).tolist() == [0.5, -1.25]


def test_bool_sequence_packs_as_bool():
    t = to_tensor([True, False])
    assert (t.dtype, t.data) == (common_pb2.DTYPE_BOOL, b"\x01\x00")


def test_narrow_and_unsigned_int_arrays_widen_losslessly():
    assert to_tensor(np.array([1, 255], dtype=np.uint8)).dtype == common_pb2.DTYPE_INT32
    t = to_tensor(np.array([2**32 - 1], dtype=np.uint32))
    assert t.dtype == common_pb2.DTYPE_INT64
    assert from_tensor(t, WHAT).tolist() == [2**32 - 1]


def test_explicit_dtype_converts_ints_to_float32():
    t = to_tensor([1, 2], common_pb2.DTYPE_FLOAT32)
    assert t.dtype == common_pb2.DTYPE_FLOAT32
    assert from_tensor(t, WHAT).tolist() == [1.0, 2.0]


def test_explicit_int_dtype_refuses_floats():
    with pytest.raises(TypeError, match="DTYPE_INT32"):
        to_tensor([1.5], common_pb2.DTYPE_INT32)


def test_explicit_int32_refuses_values_that_overflow():
    with pytest.raises(ValueError, match="do not fit DTYPE_INT32"):
        to_tensor(np.array([2**40]), common_pb2.DTYPE_INT32)


def test_strings_cannot_be_packed():
    with pytest.raises(TypeError, match="cannot pack"):
        to_tensor(["a", "b"])


def test_bf16_round_trips_representable_values_exactly():
    values = np.array([1.0, -2.5, 0.15625, 0.0, np.inf], dtype=np.float32)
    t = to_tensor_bf16(values)
    assert (t.dtype, list(t.shape), len(t.data)) == (common_pb2.DTYPE_BFLOAT16, [5], 10)
    back = from_tensor(t, WHAT)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, values)


def test_bf16_rounds_to_nearest_even():
    # 1 + 2**-8 lies exactly between bf16 neighbours 1.0 and 1 + 2**-7: ties go to even
    # (1.0); 1 + 3 * 2**-8 lies between 1 + 2**-7 and 1 + 2**-6 and goes to the even 1 + 2**-6.
    t = to_tensor_bf16([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-12])
    assert from_tensor(t, WHAT).tolist() == [1.0, 1 + 2**-6, 1 + 2**-7]


def test_bf16_keeps_nan_a_nan():
    nan_low_payload = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    assert np.isnan(from_tensor(to_tensor_bf16(nan_low_payload), WHAT)).all()


def test_bf16_decodes_as_upper_half_of_float32():
    t = raw(b"\x80\x3f\x20\xc0", common_pb2.DTYPE_BFLOAT16, [2])  # 0x3F80, 0xC020
    assert from_tensor(t, WHAT).tolist() == [1.0, -2.5]


def test_explicit_bf16_dtype_uses_bf16_packing():
    assert to_tensor([1.0], common_pb2.DTYPE_BFLOAT16).data == b"\x80\x3f"


# ------------------------------------------------------------------------ from_tensor


def test_from_tensor_result_cannot_modify_the_message():
    t = to_tensor(np.array([1.0, 2.0], dtype=np.float32))
    back = from_tensor(t, WHAT)
    with pytest.raises(ValueError):
        back[0] = 5.0
    assert from_tensor(t, WHAT).tolist() == [1.0, 2.0]


def test_unspecified_dtype_is_invalid_argument():
    with pytest.raises(InvalidArgument) as err:
        from_tensor(raw(b"\0" * 4, common_pb2.DTYPE_UNSPECIFIED, [1]), WHAT)
    assert err.value.message.startswith(f"{WHAT}: dtype is DTYPE_UNSPECIFIED")
    assert "DTYPE_FLOAT32" in err.value.message


def test_unknown_dtype_number_is_invalid_argument():
    with pytest.raises(InvalidArgument, match=r"unknown dtype 42 is not a DType") as err:
        from_tensor(raw(b"", 42, [0]), WHAT)
    assert err.value.message.startswith(WHAT)


def test_data_length_mismatch_names_both_byte_counts():
    with pytest.raises(InvalidArgument) as err:
        from_tensor(raw(b"\0" * 10, common_pb2.DTYPE_FLOAT32, [2, 2]), WHAT)
    msg = err.value.message
    assert msg.startswith(f"{WHAT}: data has 10 bytes but shape [2, 2] of DTYPE_FLOAT32 needs 16")


def test_scalar_needs_one_element_of_data():
    with pytest.raises(InvalidArgument, match="data has 0 bytes but shape \\[\\] .* needs 8"):
        from_tensor(raw(b"", common_pb2.DTYPE_INT64, []), WHAT)


def test_negative_dimension_is_invalid_argument():
    with pytest.raises(InvalidArgument) as err:
        from_tensor(raw(b"", common_pb2.DTYPE_INT32, [3, -1]), WHAT)
    assert err.value.message.startswith(
        f"{WHAT}: shape [3, -1] has negative dimension -1 at index 1"
    )


def test_bool_byte_other_than_zero_or_one_is_invalid_argument():
    with pytest.raises(InvalidArgument, match=r"byte 2 at position 1 is not a bool"):
        from_tensor(raw(b"\x01\x02", common_pb2.DTYPE_BOOL, [2]), WHAT)


# ------------------------------------------------------------------------ tokens


def test_tokens_widen_int32_to_writable_int64():
    ids = tokens(to_tensor([3, 1, 4]), "x")
    assert ids.dtype == np.int64
    assert ids.tolist() == [3, 1, 4]
    ids[0] = 9  # a private copy, not a view of the request


def test_tokens_reject_float_dtype():
    with pytest.raises(InvalidArgument) as err:
        tokens(to_tensor([1.0]), "data[0].datum.input_tokens")
    assert err.value.message == (
        "data[0].datum.input_tokens: token ids must be DTYPE_INT32 or DTYPE_INT64, "
        "got DTYPE_FLOAT32"
    )


def test_tokens_reject_unspecified_dtype_with_the_dtype_message():
    with pytest.raises(InvalidArgument, match="x: dtype is DTYPE_UNSPECIFIED"):
        tokens(raw(b"\0" * 4, common_pb2.DTYPE_UNSPECIFIED, [1]), "x")


def test_tokens_reject_two_dimensional_shape():
    with pytest.raises(InvalidArgument, match=r"x: token ids must be 1-D \(shape \[N\]\), got"):
        tokens(to_tensor(np.zeros((2, 3), dtype=np.int32)), "x")


def test_tokens_reject_scalar_shape():
    with pytest.raises(InvalidArgument, match=r"got shape \[\]"):
        tokens(to_tensor(np.int32(4)), "x")


def test_tokens_reject_negative_id_naming_its_position():
    with pytest.raises(InvalidArgument) as err:
        tokens(to_tensor([1, 2, 3, 4, 5, -3, -4]), "data[1].datum.target_tokens")
    assert err.value.message.startswith("data[1].datum.target_tokens: token id -3 at position 5")


# ------------------------------------------------------------------------ floats


@pytest.mark.parametrize(
    "tensor",
    [
        to_tensor(np.array([0.5, -1.0], dtype=np.float32)),
        to_tensor(np.array([0.5, -1.0], dtype=np.float64)),
        to_tensor(np.array([0.5, -1.0], dtype=np.float16)),
        to_tensor_bf16([0.5, -1.0]),
    ],
    ids=["float32", "float64", "float16", "bfloat16"],
)
def test_floats_accept_every_float_dtype_as_float32(tensor):
    values = floats(tensor, WHAT)
    assert values.dtype == np.float32
    assert values.tolist() == [0.5, -1.0]


def test_floats_reject_int_dtype():
    with pytest.raises(InvalidArgument) as err:
        floats(to_tensor([1, 0]), WHAT)
    assert err.value.message.startswith(f"{WHAT}: floats must be DTYPE_FLOAT32")
    assert err.value.message.endswith("got DTYPE_INT32")


def test_floats_reject_nan_naming_its_position():
    with pytest.raises(InvalidArgument) as err:
        floats(to_tensor([0.0, 1.0, 2.0, 3.0, np.nan, np.nan]), WHAT)
    assert err.value.message == f"{WHAT}: NaN at position 4: values must be finite"


def test_floats_reject_negative_infinity_naming_its_position():
    with pytest.raises(InvalidArgument, match=re.escape(f"{WHAT}: -inf at position 1")):
        floats(to_tensor([0.0, -np.inf]), WHAT)


def test_floats_allow_non_finite_values_when_asked():
    values = floats(to_tensor([np.nan, np.inf]), WHAT, finite=False)
    assert np.isnan(values[0]) and np.isinf(values[1])


def test_floats_reject_float64_beyond_float32_range():
    with pytest.raises(
        InvalidArgument, match=r"value 1e\+300 at position 1 is outside the float32"
    ):
        floats(to_tensor(np.array([0.0, 1e300])), WHAT)


def test_floats_reject_two_dimensional_shape():
    with pytest.raises(InvalidArgument, match=re.escape(f"{WHAT}: floats must be 1-D")):
        floats(to_tensor(np.zeros((1, 2), dtype=np.float32)), WHAT)


# ------------------------------------------------------------------------ is_set


def test_is_set_false_for_unset_field():
    assert not is_set(common_pb2.Datum(), "weights")


def test_is_set_false_for_all_default_tensor():
    assert not is_set(common_pb2.Datum(weights=common_pb2.Tensor()), "weights")


def test_is_set_true_for_empty_but_typed_tensor():
    d = common_pb2.Datum(weights=to_tensor([], common_pb2.DTYPE_FLOAT32))
    assert is_set(d, "weights")
