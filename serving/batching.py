"""Server-side request batching, after TF Serving's SharedBatchScheduler + BatchingSession.

Tasks with the same key (same servable, signature and trailing input shapes) are queued
together; a batch is formed when it reaches `max_batch_size` rows or its oldest task has waited
`batch_timeout_micros`, and only when one of `num_batch_threads` workers is free, so batches
grow while the model is busy. The merged call is split back row-wise.

As in TF Serving, every input of a batched request needs a leading batch dimension of the same
size: rank-0 inputs are refused with TF Serving's own message instead of being run unbatched,
so nothing passes here that ``tensorflow_model_server --enable_batching`` would refuse.

This module needs only numpy, so it can be tested without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from serving.errors import Code, ServingError

RunFn = Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """BatchingParameters with TF Serving's defaults."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    pad_variable_length_inputs: bool = False
    allowed_batch_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.batch_timeout_micros < 0:
            raise ValueError("batch_timeout_micros must be >= 0")
        if self.max_enqueued_batches < 1:
            raise ValueError("max_enqueued_batches must be >= 1")
        if self.num_batch_threads < 1:
            raise ValueError("num_batch_threads must be >= 1")
        sizes = list(self.allowed_batch_sizes)
        if sizes and (sizes != sorted(sizes) or sizes[-1] != self.max_batch_size):
            raise ValueError("allowed_batch_sizes must be increasing and end with max_batch_size")


def parse_batching_parameters(text: str) -> BatchingOptions:
    """Parses a BatchingParameters text proto (the --batching_parameters_file format)."""
    from google.protobuf import text_format

    proto = _batching_parameters_class()()
    try:
        text_format.Parse(text, proto)
    except text_format.ParseError as exc:
        raise ValueError(f"invalid batching parameters: {exc}") from exc
    defaults = BatchingOptions()
    kwargs: dict[str, object] = {}
    for field in (
        "max_batch_size",
        "batch_timeout_micros",
        "max_enqueued_batches",
        "num_batch_threads",
    ):
        kwargs[field] = (
            getattr(proto, field).value if proto.HasField(field) else getattr(defaults, field)
        )
    kwargs["pad_variable_length_inputs"] = proto.pad_variable_length_inputs
    kwargs["allowed_batch_sizes"] = tuple(proto.allowed_batch_sizes)
    return BatchingOptions(**kwargs)  # type: ignore[arg-type]


def _batching_parameters_class() -> type:
    """Returns TF Serving's BatchingParameters message class.

    The tensorflow-serving-api wheel does not ship session_bundle_config_pb2, so when it is
    missing the message is rebuilt from the same field numbers and types as
    tensorflow_serving/servables/tensorflow/session_bundle_config.proto; text files written for
    tensorflow_model_server parse identically.
    """
    try:
        from tensorflow_serving.servables.tensorflow import session_bundle_config_pb2

        return session_bundle_config_pb2.BatchingParameters
    except ImportError:
        pass
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="serving_local/batching_parameters.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    msg = file_proto.message_type.add(name="BatchingParameters")
    fdp = descriptor_pb2.FieldDescriptorProto
    wrapped = [
        ("max_batch_size", 1, ".google.protobuf.Int64Value"),
        ("batch_timeout_micros", 2, ".google.protobuf.Int64Value"),
        ("max_enqueued_batches", 3, ".google.protobuf.Int64Value"),
        ("num_batch_threads", 4, ".google.protobuf.Int64Value"),
        ("thread_pool_name", 5, ".google.protobuf.StringValue"),
    ]
    for name, number, type_name in wrapped:
        msg.field.add(
            name=name,
            number=number,
            label=fdp.LABEL_OPTIONAL,
            type=fdp.TYPE_MESSAGE,
            type_name=type_name,
        )
    msg.field.add(
        name="allowed_batch_sizes", number=6, label=fdp.LABEL_REPEATED, type=fdp.TYPE_INT64
    )
    msg.field.add(
        name="pad_variable_length_inputs", number=7, label=fdp.LABEL_OPTIONAL, type=fdp.TYPE_BOOL
    )
    pool.Add(file_proto)
    descriptor = pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
    return message_factory.GetMessageClass(descriptor)


@dataclasses.dataclass
class _Task:
    inputs: dict[str, np.ndarray]
    size: int
    run: RunFn
    enqueued: float
    future: Future = dataclasses.field(default_factory=Future)


@dataclasses.dataclass
class _Queue:
    tasks: list[_Task] = dataclasses.field(default_factory=list)
    size: int = 0


class Batcher:
    """Merges concurrent same-key tasks into one call; `submit` blocks until its rows return."""

    def __init__(self, options: BatchingOptions) -> None:
        self.options = options
        self._cv = threading.Condition()
        self._queues: dict[Hashable, _Queue] = {}
        self._free_workers = options.num_batch_threads
        self._stopping = False
        self._draining = False
        self._executor = ThreadPoolExecutor(
            max_workers=options.num_batch_threads, thread_name_prefix="batch"
        )
        self._scheduler = threading.Thread(target=self._schedule, name="batch-scheduler")
        self._scheduler.daemon = True
        self._scheduler.start()
        self.num_batches = 0  # executed batches and their rows, for logs and benchmarks
        self.num_rows = 0
        self.max_rows = 0

    def submit(
        self, key: Hashable, inputs: dict[str, np.ndarray], size: int, run: RunFn
    ) -> dict[str, np.ndarray]:
        """Queues `inputs` (`size` rows along dim 0) and returns this task's output rows."""
        max_size = self.options.max_batch_size
        if size > max_size:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                f"Task size {size} is larger than maximum input batch size {max_size}",
            )
        task = _Task(inputs=inputs, size=size, run=run, enqueued=time.monotonic())
        with self._cv:
            if self._stopping:
                raise ServingError(Code.UNAVAILABLE, "Batch scheduler is shutting down")
            queue = self._queues.setdefault(key, _Queue())
            open_batches = -(-(queue.size + size) // max_size)
            if open_batches > self.options.max_enqueued_batches:
                raise ServingError(
                    Code.UNAVAILABLE,
                    "The batch scheduling queue to which this session object belongs is full",
                )
            queue.tasks.append(task)
            queue.size += size
            if self._free_workers > 0:  # else the batch that frees one wakes the scheduler
                self._cv.notify_all()
        return task.future.result()

    def drain(self) -> None:
        """Runs queued tasks without waiting out their batch timeout (used at shutdown)."""
        with self._cv:
            self._draining = True
            self._cv.notify_all()

    def stop(self) -> None:
        """Runs every queued task now, then stops the scheduler and workers."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._scheduler.join()
        self._executor.shutdown(wait=True)

    # -- scheduler ----------------------------------------------------------------------------

    def _schedule(self) -> None:
        timeout_s = self.options.batch_timeout_micros / 1e6
        with self._cv:
            while True:
                if self._stopping and not self._queues:
                    return
                wait_s: float | None = None
                if self._free_workers > 0 and self._queues:
                    now = time.monotonic()
                    # Oldest head task first, so no key starves.
                    key, queue = min(self._queues.items(), key=lambda kv: kv[1].tasks[0].enqueued)
                    age = now - queue.tasks[0].enqueued
                    full = queue.size >= self.options.max_batch_size
                    if full or age >= timeout_s or self._stopping or self._draining:
                        batch = self._take(key, queue)
                        self._free_workers -= 1
                        self._executor.submit(self._run_batch, batch)
                        continue
                    wait_s = timeout_s - age
                self._cv.wait(wait_s)

    def _take(self, key: Hashable, queue: _Queue) -> list[_Task]:
        batch: list[_Task] = []
        rows = 0
        while queue.tasks and rows + queue.tasks[0].size <= self.options.max_batch_size:
            task = queue.tasks.pop(0)
            rows += task.size
            batch.append(task)
        queue.size -= rows
        if not queue.tasks:
            del self._queues[key]
        return batch

    def _run_batch(self, batch: list[_Task]) -> None:
        try:
            total = sum(t.size for t in batch)
            merged = _merge([t.inputs for t in batch])
            outputs = batch[0].run(merged)
            offset = 0
            for task in batch:
                rows = {}
                for name, value in outputs.items():
                    arr = np.asarray(value)
                    if arr.ndim == 0 or arr.shape[0] != total:
                        raise ServingError(
                            Code.INTERNAL,
                            "Batched output tensor's 0th dimension does not equal the sum of "
                            f"the 0th dimension sizes of the input tensors (output {name!r})",
                        )
                    rows[name] = arr[offset : offset + task.size]
                offset += task.size
                task.future.set_result(rows)
            with self._cv:
                self.num_batches += 1
                self.num_rows += total
                self.max_rows = max(self.max_rows, total)
        except BaseException as exc:  # every waiting request must be released
            for task in batch:
                if not task.future.done():
                    task.future.set_exception(exc)
        finally:
            with self._cv:
                self._free_workers += 1
                self._cv.notify_all()


def _merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenates every input along dim 0."""
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def batch_key_and_size(
    base_key: Hashable, inputs: Mapping[str, np.ndarray]
) -> tuple[Hashable, int]:
    """Returns (queue key, rows) for a request, raising TF Serving's batching errors.

    The key holds the trailing shapes, since only requests that agree on them can be
    concatenated (``pad_variable_length_inputs`` is not implemented).
    """
    size: int | None = None
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for name in sorted(inputs):
        arr = inputs[name]
        if np.ndim(arr) == 0:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "Batching Run() input tensors must have at least one dimension",
            )
        if size is not None and arr.shape[0] != size:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "Batching Run() input tensors must have equal 0th-dimension size",
            )
        size = arr.shape[0]
        shapes.append((name, tuple(arr.shape[1:])))
    return (base_key, tuple(shapes)), size or 0
