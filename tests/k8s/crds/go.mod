module github.com/hami-ray/hami-ray/tests/k8s/crds

go 1.24.0

// Pins the real CustomResourceDefinitions the deploy/ manifests are checked against in the test
// cluster (make k8s-bin copies them to .k8s/crds): KubeRay's RayCluster and prometheus-operator's
// ServiceMonitor. Nothing here is compiled.
require (
	github.com/prometheus-operator/prometheus-operator v0.85.0
	github.com/ray-project/kuberay/ray-operator v1.5.0
)
