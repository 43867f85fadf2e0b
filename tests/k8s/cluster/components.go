// The children of hami-k8s-cluster: `hami-k8s-cluster etcd|apiserver|controller-manager -dir D ...`
// (this binary run again by the supervisor), and the arguments of kwok. Every flag that decides a
// port, a data directory, a key or a certificate comes from the parent, so that a restarted child
// serves the same cluster.
package main

import (
	"context"
	"flag"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

// managerUser is the controller-manager's own identity (tokens.csv): the bootstrap RBAC binds it to the
// system:kube-controller-manager ClusterRole, which lets it mint a token per controller
// (--use-service-account-credentials, as kubeadm runs it), each controller with its bootstrap role.
const managerUser = "system:kube-controller-manager"

// kwokLeaseSeconds is each kwok node's Lease duration: kwok renews it every quarter (5 s), as the kubelet
// renews its 40 s lease every 10 s. nodeMonitorGraceSeconds (the controller-manager's
// --node-monitor-grace-period) is four renewals, upstream's ratio before 1.32 (40 s for 10 s; 50 s
// since): a node whose heartbeat stops is NotReady 15-22 s later (a test can wait for that), while an
// API server restart of a few seconds costs a node at most one renewal and no NotReady.
const (
	kwokLeaseSeconds        = 20
	kwokRenewSeconds        = kwokLeaseSeconds / 4 // kwok's own rule, the kubelet's
	nodeMonitorGraceSeconds = 4 * kwokRenewSeconds
)

// managerControllers: what issue 15 needs of a real cluster. node lifecycle (Ready=Unknown and the
// unreachable taints when a node's heartbeat stops) and taint eviction (pods without a toleration leave
// a NoExecute node; the API server gives every pod 300 s of it), the garbage collector (ownerReferences),
// namespace deletion, and default ServiceAccounts with legacy token Secrets.
const managerControllers = "node-lifecycle-controller,taint-eviction-controller,garbage-collector-controller," +
	"namespace-controller,serviceaccount-controller,serviceaccount-token-controller"

var components = map[string]func(args []string) error{
	"etcd":               runEtcd,
	"apiserver":          runAPIServer,
	"controller-manager": runControllerManager,
}

func runEtcd(args []string) error {
	fs := flag.NewFlagSet("etcd", flag.ExitOnError)
	dir := fs.String("dir", "", "state directory")
	clientPort := fs.Int("client-port", 0, "client port on 127.0.0.1")
	peerPort := fs.Int("peer-port", 0, "peer port on 127.0.0.1")
	_ = fs.Parse(args)
	cfg := embed.NewConfig()
	cfg.Dir = filepath.Join(*dir, "etcd")
	cfg.LogLevel = "error"
	cu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", *clientPort))
	pu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", *peerPort))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = fmt.Sprintf("%s=%s", cfg.Name, pu.String())
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	etcd, err := embed.StartEtcd(cfg)
	if err != nil {
		return err
	}
	defer etcd.Close()
	select {
	case <-etcd.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return fmt.Errorf("not ready after 60 s")
	}
	select {
	case <-ctx.Done():
		return nil
	case err := <-etcd.Err():
		return err
	}
}

func runAPIServer(args []string) error {
	fs := flag.NewFlagSet("apiserver", flag.ExitOnError)
	dir := fs.String("dir", "", "state directory")
	port := fs.Int("port", 0, "secure port on 127.0.0.1")
	etcd := fs.String("etcd", "", "etcd client URL")
	_ = fs.Parse(args)
	key := filepath.Join(*dir, "sa.key")
	cmd := apiserver.NewAPIServerCommand()
	cmd.SetArgs([]string{
		"--etcd-servers=" + *etcd,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", *port),
		// made on the first start, kept by the next: the kubeconfig's authority stays valid
		"--cert-dir=" + filepath.Join(*dir, "certs"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + key,
		"--service-account-signing-key-file=" + key,
		"--token-auth-file=" + filepath.Join(*dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--enable-priority-and-fairness=false",
		// nodes are created without the not-ready taint: the controller-manager would lift it from kwok's
		// nodes once Ready, but the tests' inventory-only nodes (no kubelet, no Ready condition) would keep
		// it, and a test that saw Ready could race the lifting
		"--disable-admission-plugins=TaintNodesByCondition",
		// as Kubernetes 1.35 and later by default (beta there): a Binding's labels are copied onto the pod, so
		// hami-ray's binds carry hami.io/vgpu-node in their one write (hami_ray/k8s/binder.py)
		"--feature-gates=PodTopologyLabelsAdmission=true",
		"--v=0",
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cmd.SetContext(ctx)
	return cmd.Execute()
}

func runControllerManager(args []string) error {
	fs := flag.NewFlagSet("controller-manager", flag.ExitOnError)
	dir := fs.String("dir", "", "state directory")
	_ = fs.Parse(args)
	cmd := controllermanager.NewControllerManagerCommand()
	cmd.SetArgs([]string{
		"--kubeconfig=" + filepath.Join(*dir, "controller-manager.kubeconfig"),
		"--use-service-account-credentials=true",
		// the API server's --service-account-key-file: it verifies the legacy token Secrets signed here
		"--service-account-private-key-file=" + filepath.Join(*dir, "sa.key"),
		"--root-ca-file=" + filepath.Join(*dir, "certs", "apiserver.crt"),
		"--controllers=" + managerControllers,
		"--leader-elect=false",
		"--secure-port=0", // no /healthz: the tests watch what the controllers do
		"--node-monitor-period=2s",
		fmt.Sprintf("--node-monitor-grace-period=%ds", nodeMonitorGraceSeconds),
		// a node that never posts a Ready condition (the scheduler tests' inventory-only nodes, no kubelet)
		// stays as it is for the length of a test session instead of going Unknown after upstream's 1 min
		"--node-startup-grace-period=1h",
		"--v=0",
	})
	return cmd.Execute()
}

const kwokConfig = `apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  nodeLeaseDurationSeconds: %d
  nodeLeaseParallelism: 4
  nodePlayStageParallelism: 4
  podPlayStageParallelism: 4
  podsOnNodeSyncParallelism: 4
`

// defaultKwok is the kwok built beside this binary by `make k8s-bin`, if it is there.
func defaultKwok() string {
	self, err := os.Executable()
	if err != nil {
		return ""
	}
	path := filepath.Join(filepath.Dir(self), "kwok")
	if _, err := os.Stat(path); err != nil {
		return ""
	}
	return path
}

// kwokArgs: kwok for the nodes annotated kwok.x-k8s.io/node=fake, with the stages that `make k8s-bin` put
// beside it (nodes become Ready and keep their leases; pods bound to them run), its config in <dir>.
func kwokArgs(path, dir string) ([]string, error) {
	config := filepath.Join(dir, "kwok.yaml")
	if err := os.WriteFile(config, []byte(fmt.Sprintf(kwokConfig, kwokLeaseSeconds)), 0o600); err != nil {
		return nil, err
	}
	return []string{"--kubeconfig", filepath.Join(dir, "kubeconfig"),
		"--manage-nodes-with-annotation-selector", "kwok.x-k8s.io/node=fake",
		"--node-lease-duration-seconds", fmt.Sprint(kwokLeaseSeconds),
		"--config", config, "--config", filepath.Join(filepath.Dir(path), "kwok-stages.yaml"),
		"--server-address", "127.0.0.1:0", "--v", "WARN"}, nil
}
