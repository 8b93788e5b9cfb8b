# Build: docker build -t cnnserve .   Run: docker run -p 8080:8080 -v $PWD/weights:/weights cnnserve
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY static static
COPY weights/README.md weights/README.md
RUN cargo build --profile dist --locked

FROM debian:bookworm-slim
COPY --from=build /src/target/dist/cnnserve /usr/local/bin/cnnserve
VOLUME /weights
ENTRYPOINT ["/usr/local/bin/cnnserve"]
