// Command hami-k8s-cluster runs a real Kubernetes control plane for hami-ray's tests: an embedded etcd
// and the real kube-apiserver (k8s.io/kubernetes, RBAC on), both on 127.0.0.1, state in -dir.
//
// It writes <dir>/kubeconfig (cluster-admin, by bearer token; the API server's self-signed certificate
// as the authority) once the API server answers /readyz, then starts kwok (-kwok, default: the kwok
// binary beside this one, when there) as the kubelet of every node annotated kwok.x-k8s.io/node=fake,
// and runs until SIGINT/SIGTERM (kwok is stopped with it, and dies with it if this is killed).
// Built by `make k8s-bin`; started by the pytest fixture and `make k8s-up`.
package main

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	dir := flag.String("dir", "", "state directory (etcd data, keys, certificates, kubeconfig)")
	port := flag.Int("port", 0, "API server port on 127.0.0.1 (0: a free one)")
	kwok := flag.String("kwok", defaultKwok(), "kwok binary for simulated nodes (empty: none)")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "-dir is required")
		os.Exit(2)
	}
	if err := run(*dir, *port, *kwok); err != nil {
		fmt.Fprintln(os.Stderr, "hami-k8s-cluster:", err)
		os.Exit(1)
	}
}

func run(dir string, port int, kwok string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	etcdClient, etcdPeer := freePort(), freePort()
	if port == 0 {
		port = freePort()
	}
	cfg := embed.NewConfig()
	cfg.Dir = filepath.Join(dir, "etcd")
	cfg.LogLevel = "error"
	cu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", etcdClient))
	pu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", etcdPeer))
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = fmt.Sprintf("%s=%s", cfg.Name, pu.String())
	etcd, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer etcd.Close()
	select {
	case <-etcd.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		return fmt.Errorf("etcd did not become ready")
	}

	key := filepath.Join(dir, "sa.key")
	if err := writeKey(key); err != nil {
		return err
	}
	token := randomHex(24)
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(fmt.Sprintf("%s,admin,admin,system:masters\n", token)), 0o600); err != nil {
		return err
	}
	cmd := app.NewAPIServerCommand()
	cmd.SetArgs([]string{
		"--etcd-servers=" + cu.String(),
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", port),
		"--cert-dir=" + filepath.Join(dir, "certs"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + key,
		"--service-account-signing-key-file=" + key,
		"--token-auth-file=" + tokens,
		"--authorization-mode=RBAC",
		"--enable-priority-and-fairness=false",
		// no node lifecycle controller runs here to lift the not-ready taint once kwok reports a node
		// Ready, so nodes are created without it (what a real cluster's Ready nodes look like)
		"--disable-admission-plugins=TaintNodesByCondition",
		"--v=0",
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cmd.SetContext(ctx)
	done := make(chan error, 1)
	go func() { done <- cmd.Execute() }()
	server := fmt.Sprintf("https://127.0.0.1:%d", port)
	if err := waitReady(server, token, done); err != nil {
		return err
	}
	kubeconfig := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: hami-test
  cluster: {server: %q, certificate-authority: %q}
users:
- name: admin
  user: {token: %q}
contexts:
- name: hami-test
  context: {cluster: hami-test, user: admin}
current-context: hami-test
`, server, filepath.Join(dir, "certs", "apiserver.crt"), token)
	tmp := filepath.Join(dir, "kubeconfig.tmp")
	if err := os.WriteFile(tmp, []byte(kubeconfig), 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, "kubeconfig")); err != nil {
		return err
	}
	if kwok != "" {
		child, err := startKwok(kwok, dir)
		if err != nil {
			return err
		}
		defer func() { _ = child.Process.Signal(syscall.SIGTERM); _ = child.Wait() }()
	}
	fmt.Println("ready", server)
	select {
	case <-ctx.Done():
		return nil
	case err := <-done:
		return err
	}
}

const kwokConfig = `apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  nodeLeaseDurationSeconds: 40
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

// startKwok runs kwok for the nodes annotated kwok.x-k8s.io/node=fake, with the stages that
// `make k8s-bin` put beside it (nodes become Ready and keep their leases; pods bound to them run),
// logging to <dir>/kwok.log.
func startKwok(path, dir string) (*exec.Cmd, error) {
	log, err := os.Create(filepath.Join(dir, "kwok.log"))
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(path, "--kubeconfig", filepath.Join(dir, "kubeconfig"),
		"--manage-nodes-with-annotation-selector", "kwok.x-k8s.io/node=fake", "--node-lease-duration-seconds", "40",
		"--config", filepath.Join(dir, "kwok.yaml"), "--config", filepath.Join(filepath.Dir(path), "kwok-stages.yaml"),
		"--server-address", "127.0.0.1:0", "--v", "WARN")
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := os.WriteFile(filepath.Join(dir, "kwok.yaml"), []byte(kwokConfig), 0o600); err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("kwok: %w", err)
	}
	return cmd, nil
}

func waitReady(server, token string, done <-chan error) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // a loopback test cluster
	deadline := time.Now().Add(180 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-done:
			return fmt.Errorf("kube-apiserver exited: %v", err)
		default:
		}
		req, _ := http.NewRequest("GET", server+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+token)
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("kube-apiserver not ready after 180 s")
}

func writeKey(path string) error {
	if _, err := os.Stat(path); err == nil {
		return nil
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	block := &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}
	return os.WriteFile(path, pem.EncodeToMemory(block), 0o600)
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
