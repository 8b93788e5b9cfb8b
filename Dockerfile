# docker build -t cnnserve .
# docker run -p 8080:8080 -v "$PWD/weights:/weights" cnnserve
# (untested here: our machines have no Docker engine)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY static static
RUN cargo build --profile dist --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/dist/cnnserve /usr/local/bin/cnnserve
VOLUME /weights
EXPOSE 8080
ENV CNNSERVE_ADDR=0.0.0.0:8080 CNNSERVE_WEIGHTS_DIR=/weights
ENTRYPOINT ["/usr/local/bin/cnnserve"]
