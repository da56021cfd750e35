.PHONY: test demo testbed lint crd

# dormant's main job on a local testbed: three vclusters and a namespace fall
# asleep and wake (by CLI, by schedule, by use) in a live status table.
demo: testbed
	cargo run --example demo

# Everything, on a fresh machine: installs the testbed, runs every test.
test:
	hack/test.sh

# Builds the pinned testbed binaries (etcd, kube-apiserver, ...) if missing.
testbed:
	hack/testbed.sh install

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

# Regenerates the CRD from the Rust types (a test fails when it drifts).
crd:
	cargo run -q -- crd > charts/dormant/crds/sleeppolicies.dormant.dev.yaml.tmp
	mv charts/dormant/crds/sleeppolicies.dormant.dev.yaml.tmp charts/dormant/crds/sleeppolicies.dormant.dev.yaml
