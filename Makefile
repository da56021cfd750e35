.PHONY: test demo testbed lint

# Everything, on a fresh machine: installs the testbed, runs every test.
test:
	hack/test.sh

# Builds the pinned testbed binaries (etcd, kube-apiserver, ...) if missing.
testbed:
	hack/testbed.sh install

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
