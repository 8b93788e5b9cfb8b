# Two images from one file; both run as a non-root user (uid 10001) with the weights dir as a
# volume, expose the HTTP port (8080) and the gRPC one (8081), and
# check their own health through `cnnserve healthcheck`.
#
#   CPU (the default target):  docker build -t cnnserve .
#                              docker run -p 8080:8080 -v "$PWD/weights:/weights" cnnserve
#   CUDA:                      docker build --target cuda -t cnnserve:cuda .
#                              docker run --gpus all -p 8080:8080 -v "$PWD/weights:/weights" cnnserve:cuda
#
# The CUDA build uses the same toolchain as CI (scripts/cuda-env.sh: nvcc and CUDA 13.0's libraries
# from PyPI's NVIDIA wheels), so it needs no CUDA base image; the NVIDIA container toolkit
# (`--gpus`) brings the driver at run time. CUDA_COMPUTE_CAP picks the GPU generation the kernels
# are compiled for (90: H100/H200; 89: L4/L40; 80: A100).
# The weights dir must be writable by uid 10001 (fine-tuned models and the job store live there).
#
# Base images are build arguments (RUST_IMAGE, RUNTIME_IMAGE), and the `cpu-prebuilt` and
# `cuda-prebuilt` targets take a binary built outside from the build context instead of compiling
# one; that is how CI builds and runs the image without an image registry
# (scripts/test-container.sh: a debootstrap'd Debian as RUNTIME_IMAGE, podman):
#
#   docker build --target cpu-prebuilt --build-arg BINARY=path/in/context/cnnserve -t cnnserve .
#   docker build --target cuda-prebuilt --build-arg BINARY=… --build-arg CUDA_LIB=dir/in/context \
#     -t cnnserve:cuda .       # CUDA_LIB: the libraries the binary links (cublas, curand, nvrtc, …)

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY static static
RUN cargo build --profile dist --locked

FROM ${RUST_IMAGE} AS build-cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY scripts/cuda-env.sh scripts/cuda-env.sh
COPY src src
COPY static static
ARG CUDA_COMPUTE_CAP=90
ENV CNNSERVE_CUDA_VENV=/opt/cuda-venv CNNSERVE_CUDA_TARGET_DIR=/src/target
RUN bash -c 'source scripts/cuda-env.sh && cargo build --profile dist --locked --features cuda \
    && mkdir /cuda-lib && cp -a "$CUDA_ROOT"/lib/. /cuda-lib/'

# What both images share. No CA bundle is needed: downloads (the default model, fetch-weights)
# use the root certificates compiled into the binary.
FROM ${RUNTIME_IMAGE} AS runtime
RUN groupadd --gid 10001 cnnserve \
    && useradd --uid 10001 --gid 10001 --home-dir /weights --no-create-home \
        --shell /usr/sbin/nologin cnnserve \
    && mkdir /weights && chown 10001:10001 /weights
ENV CNNSERVE_ADDR=0.0.0.0:8080 CNNSERVE_GRPC_ADDR=0.0.0.0:8081 CNNSERVE_WEIGHTS_DIR=/weights \
    CNNSERVE_HEALTHCHECK_URL=http://127.0.0.1:8080/health
VOLUME /weights
# 8080: HTTP. 8081: gRPC (the Open Inference Protocol, h2c).
EXPOSE 8080 8081
# Healthy once the default model is loaded (/health answers 200; 503 while loading, or when the
# default model failed), checked by the binary itself (no curl in the image). Loading vgg11_bn
# takes seconds, downloading it first (an empty weights volume, without --offline) a minute or
# more: the start period covers that. Serving on another port? Set CNNSERVE_HEALTHCHECK_URL too.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["/usr/local/bin/cnnserve", "healthcheck"]
STOPSIGNAL SIGTERM
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/cnnserve"]

# The CUDA runtime: CUDA 13.0's libraries next to the binary, the driver from the host.
FROM runtime AS cuda-runtime
ENV LD_LIBRARY_PATH=/usr/local/lib/cnnserve-cuda CNNSERVE_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
# A GPU's first start also loads the CUDA libraries and compiles kernels for the GPU found.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["/usr/local/bin/cnnserve", "healthcheck"]

# A binary (and, for CUDA, its libraries) built outside, from the build context.
FROM cuda-runtime AS cuda-prebuilt
ARG BINARY=cnnserve
ARG CUDA_LIB=cuda-lib
COPY ${CUDA_LIB} /usr/local/lib/cnnserve-cuda
COPY ${BINARY} /usr/local/bin/cnnserve

FROM runtime AS cpu-prebuilt
ARG BINARY=cnnserve
COPY ${BINARY} /usr/local/bin/cnnserve

FROM cuda-runtime AS cuda
COPY --from=build-cuda /cuda-lib /usr/local/lib/cnnserve-cuda
COPY --from=build-cuda /src/target/dist/cnnserve /usr/local/bin/cnnserve

# Last, so that it is the default target.
FROM runtime AS cpu
COPY --from=build /src/target/dist/cnnserve /usr/local/bin/cnnserve
