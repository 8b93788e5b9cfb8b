# Two images from one file; both run as a non-root user with the weights dir as a volume, and
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
# The weights dir must be writable by uid 10001 (fine-tuned models are saved there).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY static static
RUN cargo build --profile dist --locked

FROM rust:1-bookworm AS build-cuda
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

FROM debian:bookworm-slim AS runtime
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /weights --shell /usr/sbin/nologin cnnserve \
    && mkdir /weights && chown cnnserve /weights
ENV CNNSERVE_ADDR=0.0.0.0:8080 CNNSERVE_WEIGHTS_DIR=/weights
VOLUME /weights
EXPOSE 8080
# Liveness through the binary itself (no curl in the image); models load in the background, so the
# start period only has to cover the process start.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/cnnserve", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/cnnserve"]

FROM runtime AS cuda
COPY --from=build-cuda /cuda-lib /usr/local/lib/cnnserve-cuda
COPY --from=build-cuda /src/target/dist/cnnserve /usr/local/bin/cnnserve
ENV LD_LIBRARY_PATH=/usr/local/lib/cnnserve-cuda CNNSERVE_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001

FROM runtime AS cpu
COPY --from=build /src/target/dist/cnnserve /usr/local/bin/cnnserve
USER 10001
