"""TF Serving's gRPC services over a Predictor: PredictionService and ModelService.

Predict, GetModelMetadata (``signature_def``) and GetModelStatus answer as TF Serving answers,
with its status codes and messages; Classify, Regress, MultiInference and
HandleReloadConfigRequest answer UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc

from serving.errors import Code, ServingError, from_exception, log_event
from serving.model_manager import ServableManager
from serving.tensors import array_to_tensor, tensor_to_array

logger = logging.getLogger("serving.server")


def add_servicers(server: grpc.Server, predictor: Any) -> None:
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionServicer(predictor), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        _ModelServicer(predictor.manager), server
    )


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException, model: str) -> None:
    err = from_exception(exc)
    log_event(
        logger,
        logging.WARNING,
        "request_error",
        api="grpc",
        method=method,
        model=model,
        code=err.code.name,
        error=err.message[:1000],
    )
    context.abort(grpc.StatusCode[err.code.name], err.message)


def _spec_version(spec: Any) -> tuple[int | None, str | None]:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return spec.version.value, None
    if choice == "version_label":
        return None, spec.version_label
    return None, None


def _unimplemented(name: str) -> Any:
    def method(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by this server")

    method.__name__ = name
    return method


class _PredictionServicer:
    """tensorflow.serving.PredictionService."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from tensorflow_serving.apis import predict_pb2

        from serving.predictor import check_input, check_input_names

        spec = request.model_spec
        start = time.monotonic()
        code = Code.OK
        try:
            version, label = _spec_version(spec)
            servable, sig = self.predictor.resolve(spec.name, version, label, spec.signature_name)
            check_input_names(sig, request.inputs.keys())
            arrays = {}
            for name, proto in request.inputs.items():
                if not proto.dtype:
                    raise ServingError(Code.INVALID_ARGUMENT, f"tensor parsing error: {name}")
                check_input(sig, name, proto.dtype, [d.size for d in proto.tensor_shape.dim])
                try:
                    arrays[name] = tensor_to_array(proto)
                except Exception as exc:
                    raise ServingError(
                        Code.INVALID_ARGUMENT, f"tensor parsing error: {name}"
                    ) from exc
            result = self.predictor.run(servable, sig, arrays, list(request.output_filter))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = result.model_name
            response.model_spec.version.value = result.version
            response.model_spec.signature_name = result.signature_name
            for name, value in result.outputs.items():
                array_to_tensor(value, response.outputs[name])
            return response
        except Exception as exc:
            code = from_exception(exc).code
            _abort(context, "Predict", exc, spec.name)
        finally:
            self.predictor.metrics.observe(
                "GRPC", spec.name, spec.signature_name[:100], code.name, time.monotonic() - start
            )

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from tensorflow_serving.apis import get_model_metadata_pb2

        try:
            if not request.HasField("model_spec"):
                raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
            if not request.metadata_field:
                raise ServingError(
                    Code.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            for field in request.metadata_field:
                if field != "signature_def":
                    raise ServingError(
                        Code.INVALID_ARGUMENT, f"Metadata field {field} is not supported"
                    )
            version, label = _spec_version(request.model_spec)
            servable = self.predictor.manager.get(request.model_spec.name, version, label)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            response.metadata["signature_def"].Pack(servable.signature_def_map)
            return response
        except Exception as exc:
            _abort(context, "GetModelMetadata", exc, request.model_spec.name)

    Classify = _unimplemented("Classify")
    Regress = _unimplemented("Regress")
    MultiInference = _unimplemented("MultiInference")


class _ModelServicer:
    """tensorflow.serving.ModelService."""

    def __init__(self, manager: ServableManager) -> None:
        self.manager = manager

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from tensorflow_serving.apis import get_model_status_pb2

        try:
            if not request.HasField("model_spec"):
                raise ServingError(Code.INVALID_ARGUMENT, "Missing ModelSpec")
            version, label = _spec_version(request.model_spec)
            response = get_model_status_pb2.GetModelStatusResponse()
            for ver, state in self.manager.status(request.model_spec.name, version, label):
                entry = response.model_version_status.add()
                entry.version = ver
                entry.state = get_model_status_pb2.ModelVersionStatus.State.Value(state.state)
                entry.status.error_code = int(state.error_code)
                entry.status.error_message = state.error_message
            return response
        except Exception as exc:
            _abort(context, "GetModelStatus", exc, request.model_spec.name)

    HandleReloadConfigRequest = _unimplemented("HandleReloadConfigRequest")
