// Gives requests that fail to parse a precise status. When a request does not deserialize (most
// often: a proto3 string field holding bytes that are not UTF-8), grpc++'s callback handlers
// answer UNIMPLEMENTED with an empty message, which misleads clients into thinking the method is
// missing. This interceptor rewrites that status to INVALID_ARGUMENT with an explanation and
// counts the request. defkv's own handlers never return UNIMPLEMENTED, so the rewrite cannot hide
// anything else.
#pragma once

#include <memory>

#include <grpcpp/support/server_interceptor.h>

#include "server/metrics.h"

namespace defkv::server {

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeParseErrorInterceptorFactory(
    Metrics& metrics);

}  // namespace defkv::server
