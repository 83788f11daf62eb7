# Sluice — the two commands a newcomer needs are `make demo` and `make test`.
# Builds are cached outside the repository (~/.cache/sluice), so a fresh clone reuses them.

SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/sluice/target
export SLUICE_CACHE ?= $(HOME)/.cache/sluice
ENV_DIR := tests/env
RELEASE := $(CARGO_TARGET_DIR)/release
IMAGE_TAG ?= dev

.PHONY: all deps env-up env-down images push test test-unit lint generate manifests bench bench-operator bench-operator-failover demo help

all: test

## deps: install what the build and the test bed need (Debian packages; idempotent)
deps:
	@bash $(ENV_DIR)/install-deps.sh

## env-up: start the test bed (Kafka, Kubernetes control plane, one real node, helm)
env-up: deps
	@bash $(ENV_DIR)/up.sh

## env-down: stop the test bed and drop its runtime state (builds stay cached)
env-down:
	@bash $(ENV_DIR)/down.sh

## images: build the release binaries, write them as OCI image archives
## (~/.cache/sluice/images) and import them into the node
# One release build serves the images, the tests (cargo test --release) and the benchmark.
images: deps
	cargo build --release --locked --workspace --bins
	bash $(ENV_DIR)/image.sh sluice.dev/operator:$(IMAGE_TAG) $(RELEASE)/sluice-operator
	bash $(ENV_DIR)/image.sh sluice.dev/consumer:$(IMAGE_TAG) $(RELEASE)/sluice-consumer
	bash $(ENV_DIR)/image.sh sluice.dev/testbed-probe:$(IMAGE_TAG) $(RELEASE)/testbed-probe
	bash $(ENV_DIR)/image.sh sluice.dev/testapp:$(IMAGE_TAG) $(RELEASE)/sluice-testapp
	bash $(ENV_DIR)/image.sh sluice.dev/inventory:$(IMAGE_TAG) $(RELEASE)/inventory

## push: push the images `make images` built (OCI archives in ~/.cache/sluice/images) to
## REGISTRY=host[:port][/path] with crane, as REGISTRY/operator:$(IMAGE_TAG) etc.
push:
	@[[ -n "$(REGISTRY)" ]] || { echo "usage: make push REGISTRY=host[:port][/path] [IMAGE_TAG=dev]" >&2; exit 2; }
	bash $(ENV_DIR)/push.sh $(REGISTRY) $(IMAGE_TAG)

## test: every test — unit, integration against real Kafka and Kubernetes, end to end
test: env-up images
	set -a; source $(SLUICE_CACHE)/state/env; set +a; \
	  cargo test --release --workspace --locked --no-fail-fast

## test-unit: only the tests that need no test bed (pure logic)
test-unit:
	cargo test --workspace --locked --lib --bins

## lint: formatting and clippy with warnings denied
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

## generate: rewrite generated artefacts (the CRD YAML and the chart's copy)
generate:
	bash operator/generate.sh
	@$(MAKE) --no-print-directory manifests

## manifests: render the chart into deploy/manifests/sluice.yaml (for kubectl-only users)
manifests:
	if [[ -f $(SLUICE_CACHE)/state/env ]]; then set -a; source $(SLUICE_CACHE)/state/env; set +a; fi; \
	  bash deploy/manifests/render.sh > deploy/manifests/sluice.yaml.tmp && \
	  mv deploy/manifests/sluice.yaml.tmp deploy/manifests/sluice.yaml

## demo: the order -> inventory scenario on the test bed: chart, 3 inventory pods, a
## rolling restart halfway, a summary and an HTML report with charts (about 2 minutes
## once the test bed is up)
# --take-ownership: the release owns the EventConsumer CRD (crds.install), which the tests
# may have applied to the test bed before; see README "Upgrading".
DEMO_NS ?= sluice-demo
demo: env-up images
	set -a; source $(SLUICE_CACHE)/state/env; set +a; set -e; \
	  kubectl create namespace sluice-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null; \
	  kubectl label namespace sluice-system --overwrite \
	    pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/enforce-version=latest >/dev/null; \
	  kubectl create namespace $(DEMO_NS) --dry-run=client -o yaml | kubectl apply -f - >/dev/null; \
	  kubectl label namespace $(DEMO_NS) --overwrite \
	    pod-security.kubernetes.io/enforce=restricted pod-security.kubernetes.io/enforce-version=latest >/dev/null; \
	  echo "== helm upgrade --install sluice charts/sluice (operator: 2 replicas, leader election; watching $(DEMO_NS), whose Role it creates there)"; \
	  helm upgrade --install sluice charts/sluice --namespace sluice-system --take-ownership \
	    --set operator.image.tag=$(IMAGE_TAG) --set sidecar.image.tag=$(IMAGE_TAG) \
	    --set operator.watchNamespace=$(DEMO_NS) \
	    --set-string 'operator.podAnnotations.sluice\.dev/build='$$(sha256sum $(RELEASE)/sluice-operator | cut -c1-12) \
	    --wait --timeout 180s >/dev/null; \
	  kubectl -n sluice-system get pods -l app.kubernetes.io/component=operator; \
	  DEMO_NAMESPACE=$(DEMO_NS) DEMO_REPORT=$(SLUICE_CACHE)/demo/report.html $(RELEASE)/order-service; \
	  shot=$$(bash $(ENV_DIR)/render-check.sh $(SLUICE_CACHE)/demo/report.html); \
	  echo "== the report renders (headless Chromium screenshot): $$shot"

## bench: performance figures against the local broker
# Built with the same workspace-wide command as `images`, so the two share one build (a
# `-p` build resolves features differently and would compile the dependencies again); the
# benchmark runs that build's sidecar (SLUICE_SIDECAR_BIN) instead of building its own.
# The Go baselines (kafka-go, sarama) are built from the Go module proxy into the cache.
bench: env-up
	cargo build --release --locked --workspace --bins
	set -a; source $(SLUICE_CACHE)/state/env; set +a; \
	  SLUICE_SIDECAR_BIN=$(RELEASE)/sluice-consumer \
	  SLUICE_BENCH_GO_BIN=$$(bash tests/bench/build-go.sh) $(RELEASE)/sluice-bench

## bench-operator: 1 000 EventConsumers against the test bed's API server and Kafka, lag on:
## convergence vs bare writes, steady-state requests/s (5 min), status writes/min, peak RSS
BENCH_OPERATOR_COUNT ?= 1000
BENCH_OPERATOR_STEADY_SECS ?= 300
bench-operator: env-up
	cargo build --release --locked -p sluice-operator
	set -a; source $(SLUICE_CACHE)/state/env; set +a; \
	  SLUICE_SCALE_COUNT=$(BENCH_OPERATOR_COUNT) SLUICE_SCALE_STEADY_SECS=$(BENCH_OPERATOR_STEADY_SECS) \
	  cargo test --release --locked -p sluice-tests --test operator_scale -- --nocapture

## bench-operator-failover: the leader of two operator processes SIGKILLed with 1 000
## EventConsumers, 3 times: kill -> new leader's first reconcile, API requests in the minute after
BENCH_FAILOVER_COUNT ?= 1000
BENCH_FAILOVER_ROUNDS ?= 3
bench-operator-failover: env-up
	cargo build --release --locked -p sluice-operator
	set -a; source $(SLUICE_CACHE)/state/env; set +a; \
	  SLUICE_FAILOVER_COUNT=$(BENCH_FAILOVER_COUNT) SLUICE_FAILOVER_ROUNDS=$(BENCH_FAILOVER_ROUNDS) SLUICE_FAILOVER_AFTER_SECS=60 \
	  cargo test --release --locked -p sluice-tests --test operator_failover -- --nocapture

## help: list the targets
help:
	@grep -E '^## ' Makefile | sed 's/^## /  /'
