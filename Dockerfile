# The image the Helm chart runs: a static-ish release build on a distroless
# base, as non-root (UID 65532) with a read-only root filesystem.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY testbed/Cargo.toml testbed/Cargo.toml
# Cache dependencies in their own layer.
RUN mkdir -p src testbed/src benches examples \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs testbed/src/lib.rs \
 && printf 'fn main() {}\n' > benches/engine.rs && cp benches/engine.rs benches/audit.rs && cp benches/engine.rs benches/proxy.rs \
 && cargo build --release --locked --bin dormant || true
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin dormant

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/dormant /usr/local/bin/dormant
USER 65532:65532
EXPOSE 8443 8444 9090
ENTRYPOINT ["/usr/local/bin/dormant"]
CMD ["agent"]
