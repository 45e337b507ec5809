"""One stand-in for Triton's `triton_python_backend_utils` (pb_utils) for the unit tests.

pb_utils exists only inside the python backend stub, so the library takes it as an argument
(orchestrator/runtime/triton_io.py, orchestrator/clients/bls.py, orchestrator/telemetry/
registry.py and gauges.py) and the unit tests pass a `FakePbUtils()` instead. It models only
what our code calls, with the real names and signatures:

- `Tensor(name, array)`: `name()`, `as_numpy()`.
- `InferenceResponse(output_tensors=..., error=...)`: `output_tensors()` (a copy of the list,
  as the real one keeps its own), `has_error()`, `error()`.
- `TritonError(message, code)`: `message()`, `code()`, and the codes as class attributes
  (TRITONSERVER_Error_Code's values: UNKNOWN 0 ... CANCELLED 7).
- `TRITONSERVER_RESPONSE_COMPLETE_FINAL`.
- `InferenceRequest(model_name=..., inputs=..., requested_output_names=..., request_id=...,
  parameters=...)`, both as a model's `execute` receives it (`inputs()`, `parameters()` as JSON
  text, `request_id()`, `requested_output_names()`, `get_response_sender()`, `is_cancelled()`)
  and as a BLS caller builds it (`exec(decoupled=...)`, answered by the `bls` hook). Every
  request built through a `FakePbUtils` is kept in its `requests`.
- `ResponseSender.send(response=None, flags=0)`: records each send in `sent` (see `Sent`) and,
  like Triton, refuses to send after the final flag.
- `MetricFamily(name=..., description=..., kind=...)` with COUNTER, GAUGE and HISTOGRAM, and
  `MetricFamily.Metric(labels=..., buckets=...)` with `increment`, `set`, `observe`. Families
  are kept in `families` by name; each update is recorded on its metric (`calls`) and, as text
  (`"set name=1"`), in the fake's `events`, where a test may interleave its own markers.
- `Logger.log_info/log_warn/log_error/log_verbose`: recorded in `logs` as (level, message).
- `is_model_ready(model_name=...)`: true for the names given as `ready`.

What differs between tests is configured per `FakePbUtils` (its classes are bound to it, so
nothing is shared between two fakes): `bls` answers `InferenceRequest.exec`, `ready` names the
models that are ready. Behaviour specific to one test file (e.g. the blocking BLS response
iterators of Triton 2.51) stays in that file, built on these classes.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, ClassVar, Iterable, NamedTuple, Sequence

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class Tensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self._name, self._value = name, value

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._value


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class InferenceResponse:
    def __init__(self, output_tensors: Sequence[Tensor] = (), error: TritonError | None = None) -> None:
        # A tuple of its own, as the real one copies the tensors it is given: the fake's
        # reference counts (`Sent.refs`) depend on there being exactly one such reference.
        self._output_tensors = tuple(output_tensors)
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return list(self._output_tensors)

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Sent(NamedTuple):
    """One `ResponseSender.send`. `refs`: the fewest references any of the response's output
    tensors had inside send(), counted as the response's own, the counting loop's, and
    `sys.getrefcount`'s argument (3) plus whatever the caller still holds; None without tensors.
    Triton 2.51 releases the tensors it drops inside send without the GIL, so a caller must
    hold them too (refs >= 4; orchestrator/runtime/triton_io.py says why)."""

    response: InferenceResponse | None
    flags: int
    refs: int | None

    @property
    def names(self) -> list[str]:
        return [] if self.response is None else [t.name() for t in self.response.output_tensors()]

    @property
    def final(self) -> bool:
        return bool(self.flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class ResponseSender:
    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.sent and self.sent[-1].final:
            raise RuntimeError("Unable to send response. Response sender has been closed.")
        tensors = () if response is None else response._output_tensors
        refs = min((sys.getrefcount(tensor) for tensor in tensors), default=None)
        self.sent.append(Sent(response, flags, refs))


class InferenceRequest:
    pb: ClassVar[FakePbUtils | None] = None  # the fake it was made through (see FakePbUtils)

    def __init__(
        self,
        model_name: str = "",
        inputs: Sequence[Tensor] = (),
        requested_output_names: Iterable[str] = (),
        request_id: str = "",
        parameters: dict[str, Any] | str | None = None,
    ) -> None:
        self.model_name = model_name
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self._request_id = request_id
        self._parameters = parameters if isinstance(parameters, str) else json.dumps(parameters or {})
        self.sender = ResponseSender()
        self.cancelled = False  # set it to make is_cancelled() true
        if self.pb is not None:
            self.pb.requests.append(self)

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def requested_output_names(self) -> list[str]:
        return list(self._requested)

    def request_id(self) -> str:
        return self._request_id

    def parameters(self) -> str:
        return self._parameters

    def get_response_sender(self) -> ResponseSender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancelled

    def exec(self, decoupled: bool = False) -> Any:
        if self.pb is None or self.pb.bls is None:
            raise RuntimeError("this fake pb_utils has no `bls` hook to answer InferenceRequest.exec")
        return self.pb.bls(self, decoupled)


class Metric:
    def __init__(self, family: MetricFamily, labels: dict[str, str], buckets: list[float] | None) -> None:
        self.family, self.labels, self.buckets = family, labels, buckets
        self.calls: list[tuple[str, float]] = []

    def _record(self, op: str, value: float) -> None:
        self.calls.append((op, value))
        if self.family.pb is not None:
            self.family.pb.events.append(f"{op} {self.family.name}={value:g}")

    def increment(self, value: float) -> None:
        self._record("increment", value)

    def set(self, value: float) -> None:
        self._record("set", value)

    def observe(self, value: float) -> None:
        self._record("observe", value)


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
    pb: ClassVar[FakePbUtils | None] = None

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[Metric] = []
        if self.pb is not None:
            self.pb.families[name] = self

    def Metric(self, labels: dict[str, str], buckets: list[float] | None = None) -> Metric:
        metric = Metric(self, labels, buckets)
        self.metrics.append(metric)
        return metric


class Logger:
    pb: ClassVar[FakePbUtils | None] = None

    @classmethod
    def _log(cls, level: str, message: str) -> None:
        if cls.pb is not None:
            cls.pb.logs.append((level, message))

    @classmethod
    def log_info(cls, message: str) -> None:
        cls._log("info", message)

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls._log("warn", message)

    @classmethod
    def log_error(cls, message: str) -> None:
        cls._log("error", message)

    @classmethod
    def log_verbose(cls, message: str) -> None:
        cls._log("verbose", message)


class FakePbUtils:
    """A pb_utils module: pass it wherever the library takes `pb_utils`.

    `bls(request, decoupled)` answers `InferenceRequest.exec` (an iterator of responses when
    decoupled, else a response; raise to refuse, as exec does for a model that is not ready).
    Like Triton, the fake keeps no reference to what `bls` returns."""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = TRITONSERVER_RESPONSE_COMPLETE_FINAL
    Tensor = Tensor
    TritonError = TritonError
    InferenceResponse = InferenceResponse

    def __init__(self, bls: Callable[[InferenceRequest, bool], Any] | None = None, ready: Iterable[str] = ()) -> None:
        self.bls = bls
        self.ready = frozenset(ready)
        self.requests: list[InferenceRequest] = []
        self.families: dict[str, MetricFamily] = {}
        self.events: list[str] = []
        self.logs: list[tuple[str, str]] = []
        # Subclasses bound to this fake, so what they record lands here and not in another test's.
        self.InferenceRequest: type[InferenceRequest] = type("InferenceRequest", (InferenceRequest,), {"pb": self})
        self.MetricFamily: type[MetricFamily] = type("MetricFamily", (MetricFamily,), {"pb": self})
        self.Logger: type[Logger] = type("Logger", (Logger,), {"pb": self})

    def is_model_ready(self, model_name: str, model_version: str = "") -> bool:
        return model_name in self.ready
