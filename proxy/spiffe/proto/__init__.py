"""Protocol buffer messages of the SPIFFE Workload API (``workload.proto``), generated code.

Source: ``proto/spiffe/workload/workload.proto`` of the go-spiffe v2.6.0 module (the version SPIRE
v1.13.3 builds with), copied here unchanged. Generated with grpcio-tools 1.85.1:

    python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. workload.proto

Checked in rather than generated at setup: the runtime then needs only ``protobuf`` and
``grpcio`` (no protoc in the image, no build step before import), and a review sees the exact
messages credproxy speaks. Only the messages are generated: the client names the five methods of
``SpiffeWorkloadAPI`` itself (``workload_api``), so no ``_grpc`` stub module is needed.
"""
