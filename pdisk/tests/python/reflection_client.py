#!/usr/bin/env python3
"""A front-end's view of pdiskd: stock grpcio, no .proto files, no generated
code. Everything it knows about the API comes from gRPC reflection v1alpha
(what grpcio-reflection speaks) over mutual TLS.

usage: reflection_client.py HOST:PORT CA CERT KEY VOLUME_NAME
Creates VOLUME_NAME (1 MiB), lists the volumes, prints JSON:
{"services": [...], "created": {...}, "volumes": [names]}
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main():
    target, ca, cert, key, name = sys.argv[1:6]
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(cert, "rb").read(),
    )
    channel = grpc.secure_channel(target, creds)
    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    pool = descriptor_pool.DescriptorPool(db)
    service = pool.FindServiceByName("pdisk.v1.VolumeService")

    def call(method_name, fields):
        method = service.FindMethodByName(method_name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        stub = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        return stub(request_class(**fields), timeout=30)

    created = call("CreateVolume", {"name": name, "size_bytes": 1 << 20})
    listed = call("ListVolumes", {})
    print(
        json.dumps(
            {
                "services": services,
                "created": json_format.MessageToDict(created),
                "volumes": [v.name for v in listed.volumes],
            }
        )
    )


if __name__ == "__main__":
    main()
