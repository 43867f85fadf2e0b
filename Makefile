# hami-ray: every target creates .venv and installs what it needs.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRACES := ../shared/traces/openb-v2023

.PHONY: demo test test-fast lint tools k8s-bin k8s-up k8s-down simulate bench clean

# the install also generates the device plugin's gRPC modules (setup.py's build_py: hami_ray/k8s/_generated,
# git-ignored), so a changed .proto or generator installs again
$(STAMP): pyproject.toml setup.py hami_ray/k8s/proto/codegen.py hami_ray/k8s/proto/deviceplugin/v1beta1/api.proto
	@test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/hami-ray demo

test: $(STAMP) lint tools k8s-bin
	$(BIN)/python -m pytest -q -p no:cacheprovider

# promtool and a Prometheus server for the metrics tests (Debian's prometheus package); nftables to drop packets
# inside the multi-host suite's own network namespaces (tests/multihost)
tools:
	@command -v promtool >/dev/null && command -v nft >/dev/null || { SUDO=$$(command -v sudo || true); \
		export DEBIAN_FRONTEND=noninteractive; PKGS="prometheus nftables"; \
		$$SUDO apt-get install -y -q --no-install-recommends $$PKGS >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends $$PKGS >/dev/null; } || \
		echo "could not install Debian's prometheus and nftables packages: the metrics and blackhole tests will fail"; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/mypy hami_ray/core hami_ray/observe hami_ray/wire.py hami_ray/k8s node_actors hami_ray/runtime/framework_caps.py --exclude 'hami_ray/k8s/_generated/'

# the test cluster: etcd + the real kube-apiserver + kube-controller-manager, built from the Kubernetes Go
# modules (tests/k8s/cluster); one binary, each component a child process it supervises (pids in <dir>/pids)
K8S_BIN := .k8s/bin/hami-k8s-cluster
K8S_SRC := $(wildcard tests/k8s/cluster/*.go) tests/k8s/cluster/go.mod tests/k8s/cluster/go.sum
KWOK_BIN := .k8s/bin/kwok
CRDS := .k8s/crds/.pinned
# it also holds the real kube-scheduler (`hami-k8s-cluster kube-scheduler ARGS`, or started with the cluster by
# -scheduler-config FILE): tests/k8s/test_extender.py and bench/k8s_bind.py run it with `hami-ray k8s extender`
k8s-bin: $(K8S_BIN) $(KWOK_BIN) $(CRDS)
$(K8S_BIN): $(K8S_SRC)
	@mkdir -p .k8s/bin
	cd tests/k8s/cluster && go build -o ../../../$(K8S_BIN) .
# the real CRDs that deploy/'s RayCluster and ServiceMonitor are validated against (tests/k8s/crds pins them)
$(CRDS): tests/k8s/crds/go.mod tests/k8s/crds/go.sum
	@mkdir -p .k8s/crds
	cd tests/k8s/crds && go mod download github.com/ray-project/kuberay/ray-operator github.com/prometheus-operator/prometheus-operator && \
		cat $$(go list -m -f '{{.Dir}}' github.com/ray-project/kuberay/ray-operator)/config/crd/bases/ray.io_rayclusters.yaml \
			> ../../../.k8s/crds/ray.io_rayclusters.yaml && \
		cat $$(go list -m -f '{{.Dir}}' github.com/prometheus-operator/prometheus-operator)/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml \
			> ../../../.k8s/crds/monitoring.coreos.com_servicemonitors.yaml
	@touch $@
# kwok (simulated nodes' kubelets) is its own module: it needs newer Kubernetes libraries (tests/k8s/kwok)
# its stages (nodes Ready with leases, pods run, finish and go) come from the module's own kustomize files
KWOK_STAGES := node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
	pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete
$(KWOK_BIN): tests/k8s/kwok/go.mod tests/k8s/kwok/go.sum
	@mkdir -p .k8s/bin
	cd tests/k8s/kwok && go build -o ../../../$(KWOK_BIN) sigs.k8s.io/kwok/cmd/kwok
	dir=$$(cd tests/k8s/kwok && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok) && \
		for s in $(KWOK_STAGES); do cat $$dir/kustomize/stage/$$s.yaml; echo "---"; done > .k8s/bin/kwok-stages.yaml

k8s-up: $(K8S_BIN) $(KWOK_BIN)
	@mkdir -p .k8s/state
	@if [ -f .k8s/cluster.pid ] && kill -0 $$(cat .k8s/cluster.pid) 2>/dev/null; then echo "already up"; else \
		rm -f .k8s/state/kubeconfig; nohup $(K8S_BIN) -dir .k8s/state > .k8s/cluster.log 2>&1 & echo $$! > .k8s/cluster.pid; \
		for i in $$(seq 1 240); do [ -f .k8s/state/kubeconfig ] && break; sleep 1; done; \
		cp .k8s/state/kubeconfig .k8s/kubeconfig && echo "up: KUBECONFIG=.k8s/kubeconfig"; fi

k8s-down:
	@if [ -f .k8s/cluster.pid ]; then pid=$$(cat .k8s/cluster.pid); kill $$pid 2>/dev/null || true; \
		for i in $$(seq 1 60); do kill -0 $$pid 2>/dev/null || break; sleep 0.5; done; \
		rm -f .k8s/cluster.pid; echo "down"; fi

simulate: $(STAMP)
	$(BIN)/hami-ray simulate --seeds 10 --policies random,dotprod,clustering,packing,bestfit,fgd,default \
		--json out/simulate-default.json --plot out/simulate-default.png

bench: $(STAMP)
	$(BIN)/python bench/placement_latency.py --queues 8 --json out/placement_latency.json

clean:
	rm -rf $(VENV) out build *.egg-info hami_ray/k8s/_generated

# the GPU conformance suite (tests/gpu) under the python3 on PATH, not .venv: a lent GPU machine has PyTorch,
# pytest and nvidia-ml-py but no Ray or pydantic. Without a GPU it says why and leaves docs/ alone.
.PHONY: gpu-check
gpu-check:
	python3 bench/gpu_check.py $(GPU_CHECK_ARGS)
