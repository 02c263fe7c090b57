"""What a topic accepts: the checks a payload must pass before it reaches a mailbox."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from array_api_compat import array_namespace, is_array_api_obj
from array_api_compat import device as device_of

_META_TYPES = (int, float, str, bool)
MAX_META_ITEMS = 16
MAX_META_TEXT = 1024  # characters in one meta string: a mailbox slot holds its message until read


@dataclass(frozen=True)
class PayloadSpec:
    """Expected dtype and, per message key, shape of a topic's arrays; optionally
    their array type and device (a state on the GPU takes no NumPy payload).

    Example::

        spec = PayloadSpec("float64", {0: (50,), 1: (14,)})
        spec.problem(0, np.zeros(50), {})      # None: fine
        spec.problem(1, np.zeros(50), {})      # "shape (50,) != expected (14,) for key 1"
        PayloadSpec("float64", {0: (50,)}, array_type=cupy.ndarray).problem(0, np.zeros(50), {})
        # "array type numpy.ndarray != expected cupy.ndarray"
    """

    dtype: str
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    finite: bool = True
    array_type: type | None = None
    device: Any = None

    def problem(self, key, payload, meta) -> str | None:
        """Why the message is malformed, or ``None`` when it may be delivered."""
        if isinstance(key, bool) or not isinstance(key, int) or key not in self.shapes:
            return f"unknown key {key!r}"
        if not is_array_api_obj(payload):
            return f"payload is a {type(payload).__name__}, not an array"
        # The receiver computes with what it takes: another library's array, or
        # one on another device, would fail there rather than here.
        if self.array_type is not None and type(payload) is not self.array_type:
            return f"array type {_type_name(type(payload))} != expected {_type_name(self.array_type)}"
        if self.device is not None and device_of(payload) != self.device:
            return f"device {device_of(payload)} != expected {self.device}"
        xp = array_namespace(payload)
        # Compare dtypes in the payload's own namespace: "float64" (or
        # "array_api_strict.float64") names the float64 of any namespace.
        expected = getattr(xp, self.dtype.rsplit(".", 1)[-1], None)
        if expected is None or payload.dtype != expected:
            return f"dtype {payload.dtype} != expected {self.dtype}"
        if tuple(payload.shape) != self.shapes[key]:
            return f"shape {tuple(payload.shape)} != expected {self.shapes[key]} for key {key}"
        if not isinstance(meta, dict) or len(meta) > MAX_META_ITEMS:
            return "meta is not a small dict"
        if not all(isinstance(k, str) and isinstance(v, _META_TYPES) for k, v in meta.items()):
            return "meta holds values other than numbers and strings"
        if any(len(text) > MAX_META_TEXT for item in meta.items() for text in item if isinstance(text, str)):
            return f"meta holds a string longer than {MAX_META_TEXT} characters"
        if self.finite and not bool(xp.all(xp.isfinite(payload))):
            return "payload holds NaN or inf"
        return None


def _type_name(t: type) -> str:
    return f"{t.__module__.split('.')[0]}.{t.__qualname__}"
