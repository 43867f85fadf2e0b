// The optional kube-scheduler of hami-k8s-cluster (issue 16): the real one from the same k8s.io/kubernetes
// module as the API server, run as `hami-k8s-cluster kube-scheduler ARGS` (its own flags, unchanged) and,
// with -scheduler-config, started and supervised by the parent like the other children.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	"sigs.k8s.io/yaml"
)

// schedulerUser is kube-scheduler's identity (tokens.csv): the bootstrap RBAC binds it to the
// system:kube-scheduler and system:volume-scheduler ClusterRoles, the rights a kubeadm scheduler has.
const schedulerUser = "system:kube-scheduler"

func init() {
	components["kube-scheduler"] = runKubeScheduler
}

// runKubeScheduler is kube-scheduler's own command with args as given. It handles SIGTERM itself and then
// answers "finished without leader elect" (upstream's Run with leader election off): a clean stop here.
func runKubeScheduler(args []string) error {
	cmd := scheduler.NewSchedulerCommand()
	cmd.SetArgs(args)
	cmd.SilenceUsage = true
	if err := cmd.Execute(); err != nil && err.Error() != "finished without leader elect" {
		return err
	}
	return nil
}

// schedulerArgs: the configuration, no serving port (nothing probes it here) and no leader election (one
// scheduler; a restarted one would otherwise wait out its predecessor's lease before it schedules).
func schedulerArgs(config string) []string {
	return []string{"--config=" + config, "--secure-port=0", "--leader-elect=false", "--v=0"}
}

// schedulerConfigFile copies the KubeSchedulerConfiguration at path to <dir>/kube-scheduler.yaml, with
// clientConnection.kubeconfig set to kubeconfig where the file leaves it empty (the cluster's address and
// token are made at start, so a caller cannot know them), and returns the copy's path. Everything else
// (profiles, extenders, client QPS) is the caller's; kube-scheduler validates it when it starts.
func schedulerConfigFile(path, dir, kubeconfig string) (string, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	raw, err := yaml.YAMLToJSON(text)
	if err != nil {
		return "", fmt.Errorf("-scheduler-config %s: %w", path, err)
	}
	var config map[string]any
	if err := json.Unmarshal(raw, &config); err != nil || config == nil {
		return "", fmt.Errorf("-scheduler-config %s: not a KubeSchedulerConfiguration object", path)
	}
	conn, _ := config["clientConnection"].(map[string]any)
	if conn == nil {
		conn = map[string]any{}
	}
	if s, _ := conn["kubeconfig"].(string); s == "" {
		conn["kubeconfig"] = kubeconfig
	}
	config["clientConnection"] = conn
	out, err := json.MarshalIndent(config, "", "  ") // JSON is YAML: kube-scheduler reads it as is
	if err != nil {
		return "", err
	}
	copyPath := filepath.Join(dir, "kube-scheduler.yaml")
	if err := os.WriteFile(copyPath, out, 0o600); err != nil {
		return "", err
	}
	return copyPath, nil
}
