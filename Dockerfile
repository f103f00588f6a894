# syntax=docker/dockerfile:1
# The `chatvault` binary (every role: gateway, archiver, restorer, standalone, client commands).
#   docker build -t chatvault:0.1.0 .
#   docker run --rm -p 50051:50051 -p 50052:50052 chatvault:0.1.0 standalone \
#       --data-dir /tmp/chatvault --gateway-listen 0.0.0.0:50051 --restorer-listen 0.0.0.0:50052

FROM rust:1.95-bookworm AS builder
# librdkafka is built from source by the rdkafka crate: a C compiler, make and zlib headers. No protoc needed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin chatvault \
    && install -m 0755 target/release/chatvault /usr/local/bin/chatvault

FROM debian:bookworm-slim
# ca-certificates for TLS to object storage; zlib is linked by librdkafka.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 nonroot \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /home/nonroot --shell /usr/sbin/nologin nonroot \
    && install -d -o 65532 -g 65532 -m 0750 /home/nonroot /var/lib/chatvault
COPY --from=builder /usr/local/bin/chatvault /usr/local/bin/chatvault
USER 65532:65532
WORKDIR /var/lib/chatvault
# gateway gRPC, restorer gRPC (archivers listen on nothing).
EXPOSE 50051 50052
ENTRYPOINT ["chatvault"]
CMD ["--help"]
