# The image the Helm chart runs: a static-ish release build on a distroless
# base, as non-root (UID 65532) with a read-only root filesystem.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY testbed/Cargo.toml testbed/Cargo.toml
# The manifest names each bench's file: they must exist for cargo to read it.
COPY benches benches
# Cache dependencies in their own layer (a stub crate on the real manifest).
RUN mkdir -p src testbed/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs testbed/src/lib.rs \
 && cargo build --release --locked --bin dormant
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin dormant

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/dormant /usr/local/bin/dormant
USER 65532:65532
EXPOSE 8443 8444 9090
ENTRYPOINT ["/usr/local/bin/dormant"]
CMD ["agent"]
