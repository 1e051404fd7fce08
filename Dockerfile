# syntax=docker/dockerfile:1
#
# outrider container image.
#
#   docker build -t outrider .
#   docker run --rm -p 8080:8080 -p 9901:9901 \
#     -v "$PWD/examples/docker-compose/outrider:/etc/outrider:ro" outrider
#
# Two stages: a Rust build stage (with cmake, which pingora-core needs to build
# zlib-ng) and a distroless runtime stage (glibc + libgcc, no shell, non-root).
# Dependencies are compiled in their own layer from Cargo.toml/Cargo.lock only,
# so editing the sources rebuilds just the outrider crate.
# No HEALTHCHECK: orchestrators probe the admin port (GET /health, GET /ready).

ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS builder

RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# --- dependency layer --------------------------------------------------------
# Build the dependency graph against placeholder sources. Cargo insists that
# every [[bench]], [[test]] and [[example]] target named in Cargo.toml exists,
# so the awk script writes an empty `fn main() {}` for each of them as well.
COPY Cargo.toml Cargo.lock ./
# Patched dependencies ([patch.crates-io] in Cargo.toml) are part of the dependency graph.
COPY vendor vendor
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    set -eu; \
    mkdir -p src; \
    echo 'fn main() {}' > src/main.rs; \
    : > src/lib.rs; \
    awk ' \
      function flush() { \
        if (kind != "" && name != "") { if (path == "") path = dir[kind] "/" name ".rs"; print path } \
        name = ""; path = "" } \
      BEGIN { dir["bench"] = "benches"; dir["test"] = "tests"; dir["example"] = "examples" } \
      /^\[\[(bench|test|example)\]\]/ { flush(); kind = $0; gsub(/[][ \t]/, "", kind); next } \
      /^\[/ { flush(); kind = ""; next } \
      kind != "" && /^name[ \t]*=/ { split($0, a, "\""); name = a[2] } \
      kind != "" && /^path[ \t]*=/ { split($0, a, "\""); path = a[2] } \
      END { flush() }' Cargo.toml \
    | while read -r stub; do mkdir -p "$(dirname "$stub")"; echo 'fn main() {}' > "$stub"; done; \
    cargo build --release --locked --bin outrider; \
    rm -rf src target/release/outrider* target/release/deps/outrider-* target/release/deps/liboutrider-* \
           target/release/.fingerprint/outrider-*

# --- application layer -------------------------------------------------------
# .dockerignore keeps target/, tests/, benches/, examples/, k8s/ and docs out of
# the context, so only changes to the crate itself invalidate this layer.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin outrider \
 && install -D -m 0755 target/release/outrider /out/outrider \
 && /out/outrider version

# --- runtime -----------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime

LABEL org.opencontainers.image.title="outrider" \
      org.opencontainers.image.description="Pingora reverse-proxy sidecar: caching, latency headers, metrics and live config for a Python/FastAPI service" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/outrider /usr/local/bin/outrider
# The embedded default configuration. Mount a directory over /etc/outrider
# (a ConfigMap or a bind mount) to replace it; edits reload without a restart.
COPY config/outrider.yaml /etc/outrider/outrider.yaml

# distroless "nonroot" user
USER 65532:65532
# 8080: proxied traffic; 9901: admin (/health /ready /metrics /config /reload)
EXPOSE 8080 9901
ENTRYPOINT ["outrider"]
CMD ["run", "--config", "/etc/outrider/outrider.yaml"]
