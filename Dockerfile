# syntax=docker/dockerfile:1.7
# defkv-server image. Two variants, chosen by a build argument:
#   docker build -t defkv:cuda .                         # default: CUDA build, for GPU hosts
#   docker build -t defkv:cpu --build-arg VARIANT=cpu .  # CPU only, Debian 12 slim
# CUDA is the default because the server exists to serve long contexts on a GPU; the CPU variant
# is for laptops, CI and trying the API with the small model.
#
# Both variants build with scripts/docker-build, which runs the project's own install and build
# steps (scripts/lib/install.sh, scripts/lib/build.sh: the same ones scripts/setup, scripts/serve
# and scripts/test run), so the image has one list of dependencies: APT_PACKAGES in
# scripts/lib/common.sh and tools/requirements.txt. CI runs `scripts/docker-build cpu DIR`
# natively (tests/python/test_deploy.py).

ARG VARIANT=cuda
# CUDA 13.0: the CUDA release of the PyPI torch==2.11.0 wheel (its nvidia-*-cu13 libraries).
ARG CUDA_DEVEL_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
ARG DEBIAN_IMAGE=debian:12-slim

# ---- build stages ----------------------------------------------------------------------------
FROM ${CUDA_DEVEL_IMAGE} AS build-cuda
# scripts/lib/install.sh finds a Debian mirror to fetch prometheus-cpp's source tarball; Ubuntu
# has none, so the tarball is put where the script looks first. The script checks its sha256
# again before building it.
ADD --checksum=sha256:65838fed64c4667140a574b78eb9f5c995bab80d575b082c9c677c6795c3c607 \
    https://deb.debian.org/debian/pool/main/p/prometheus-cpp/prometheus-cpp_1.0.2.orig.tar.gz \
    /src/.deps/src/prometheus-cpp_1.0.2.orig.tar.gz

FROM ${DEBIAN_IMAGE} AS build-cpu

FROM build-${VARIANT} AS build
ARG VARIANT
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
COPY . /src
# No GPU exists during `docker build`: name the architecture so CMake does not probe for one.
ENV TORCH_CUDA_ARCH_LIST=9.0
RUN scripts/docker-build "${VARIANT}" /opt/defkv

# ---- runtime stages --------------------------------------------------------------------------
# The CUDA base image brings the NVIDIA_* variables the container toolkit reads to mount the
# driver (libcuda, libnvidia-ml); the CUDA libraries themselves come from the torch wheel.
FROM ${CUDA_RUNTIME_IMAGE} AS runtime-cuda
FROM ${DEBIAN_IMAGE} AS runtime-cpu

FROM runtime-${VARIANT} AS runtime
ARG VARIANT
# Only the Debian packages whose libraries the binaries load (runtime-packages.txt is derived
# from ldd in the build stage), nothing to compile with.
COPY --from=build /opt/defkv/runtime-packages.txt /opt/defkv/runtime-packages.txt
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      $(cat /opt/defkv/runtime-packages.txt) ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/defkv/bin/ /opt/defkv/bin/
COPY --from=build /opt/defkv/lib/ /opt/defkv/lib/
# The default model, so the image answers out of the box; mount another one over /models.
COPY models/stories260K/ /models/

# uid 1000: Kubernetes' runAsNonRoot and volume permissions expect a numeric, fixed user.
# Ubuntu 24.04 images already have `ubuntu` as uid 1000; it is replaced.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel -r ubuntu; fi \
 && groupadd --gid 1000 defkv \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin defkv

ENV PATH=/opt/defkv/bin:$PATH \
    LD_LIBRARY_PATH=/opt/defkv/lib \
    MODEL_DIR=/models \
    DEFKV_VARIANT=${VARIANT}
USER 1000:1000
# 50051: gRPC (defkv.v1.DefKV, grpc.health.v1, reflection); 9464: Prometheus /metrics.
EXPOSE 50051 9464
# `defkv health` exits 0 only when the server answers SERVING (NOT_SERVING while the model loads
# and while draining). start-period covers loading a large model.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["defkv", "--addr", "127.0.0.1:50051", "--timeout", "4", "health"]
# exec: the server is PID 1 and gets SIGTERM itself, so `docker stop` drains. The device flag
# follows the variant unless the caller passes --device; flags given to `docker run` come last
# and win (absl flags: the last value counts).
ENTRYPOINT ["/bin/sh", "-c", "exec defkv-server --host=0.0.0.0 --port=50051 --metrics_port=9464 --model=\"$MODEL_DIR\" --device=\"$([ \"$DEFKV_VARIANT\" = cuda ] && echo cuda || echo cpu)\" \"$@\"", "defkv-server"]
CMD []
