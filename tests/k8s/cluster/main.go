// Command hami-k8s-cluster runs a real Kubernetes control plane for hami-ray's tests, on 127.0.0.1,
// state in -dir: etcd, the real kube-apiserver (k8s.io/kubernetes, RBAC on), the real
// kube-controller-manager (node lifecycle, taint eviction, garbage collector, namespace and
// service account controllers) and kwok as the kubelet of every node annotated kwok.x-k8s.io/node=fake.
//
// Each component is a child process: this binary run again with a subcommand (etcd, apiserver,
// controller-manager; kwok is its own binary). The parent supervises them: it writes each child's pid
// to <dir>/pids/<name>.pid, starts a child that dies (a test's SIGKILL, issue 15's chaos run) again on
// the same ports, data and certificates, so that <dir>/kubeconfig stays valid, stops them all on
// SIGINT/SIGTERM, and they die with it if it is killed (Pdeathsig). Each child logs to <dir>/<name>.log.
//
// It writes <dir>/kubeconfig (cluster-admin, by bearer token; the API server's self-signed certificate
// as the authority) once the API server answers /readyz, then starts the controller-manager and kwok.
//
// Only when asked (-scheduler-config FILE, a KubeSchedulerConfiguration), it also runs the real
// kube-scheduler of the same module as a supervised child (bench/k8s_bind.py's kube-scheduler and
// extender modes, issue 16), with the rights of the bootstrap user system:kube-scheduler. A default start
// runs no scheduler and costs nothing more. `hami-k8s-cluster kube-scheduler ARGS` runs kube-scheduler
// alone with its own flags (tests/k8s/test_extender.py starts one per test).
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
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"
)

func init() {
	// Pdeathsig fires when the thread that started the child ends, not the process: every child is started
	// from the main goroutine, kept on the main thread, which lives as long as the process.
	runtime.LockOSThread()
}

func main() {
	if len(os.Args) > 1 {
		if component, ok := components[os.Args[1]]; ok {
			if err := component(os.Args[2:]); err != nil {
				fmt.Fprintf(os.Stderr, "hami-k8s-cluster %s: %v\n", os.Args[1], err)
				os.Exit(1)
			}
			return
		}
	}
	dir := flag.String("dir", "", "state directory (etcd data, keys, certificates, kubeconfig, pids, logs)")
	port := flag.Int("port", 0, "API server port on 127.0.0.1 (0: a free one)")
	kwok := flag.String("kwok", defaultKwok(), "kwok binary for simulated nodes (empty: none)")
	schedulerConfig := flag.String("scheduler-config", "",
		"a KubeSchedulerConfiguration: run kube-scheduler with it (empty: no scheduler); an empty "+
			"clientConnection.kubeconfig is filled with the cluster's, leader election is off")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "-dir is required")
		os.Exit(2)
	}
	if err := run(*dir, *port, *kwok, *schedulerConfig); err != nil {
		fmt.Fprintln(os.Stderr, "hami-k8s-cluster:", err)
		os.Exit(1)
	}
}

// run prepares the state directory, starts the children in order (etcd, the API server, then the
// controller-manager, kwok and, with schedulerConfig, kube-scheduler once the kubeconfig is written) and
// supervises them until a signal.
func run(dir string, port int, kwok, schedulerConfig string) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(dir, "pids"), 0o700); err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	etcdClient, etcdPeer := freePort(), freePort()
	if port == 0 {
		port = freePort()
	}
	if err := writeKey(filepath.Join(dir, "sa.key")); err != nil {
		return err
	}
	// tokens are made once per run of this program: a restarted API server reads the same file
	adminToken, managerToken, schedulerToken := randomHex(24), randomHex(24), randomHex(24)
	tokens := fmt.Sprintf("%s,admin,admin,system:masters\n%s,%s,%s\n%s,%s,%s\n",
		adminToken, managerToken, managerUser, managerUser, schedulerToken, schedulerUser, schedulerUser)
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(tokens), 0o600); err != nil {
		return err
	}
	server := fmt.Sprintf("https://127.0.0.1:%d", port)
	ca := filepath.Join(dir, "certs", "apiserver.crt")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	sup := newSupervisor(dir)
	defer sup.stopAll()

	etcd := sup.add("etcd", self, "etcd", "-dir", dir,
		"-client-port", fmt.Sprint(etcdClient), "-peer-port", fmt.Sprint(etcdPeer))
	if err := sup.start(etcd); err != nil {
		return err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", etcdClient)
	if err := waitHTTP(ctx, etcd, etcdURL+"/health", "", 60*time.Second); err != nil {
		return err
	}
	apiserver := sup.add("apiserver", self, "apiserver", "-dir", dir, "-port", fmt.Sprint(port), "-etcd", etcdURL)
	if err := sup.start(apiserver); err != nil {
		return err
	}
	if err := waitHTTP(ctx, apiserver, server+"/readyz", adminToken, 180*time.Second); err != nil {
		return err
	}
	if err := writeKubeconfig(filepath.Join(dir, "kubeconfig"), server, ca, "admin", adminToken); err != nil {
		return err
	}
	managerConfig := filepath.Join(dir, "controller-manager.kubeconfig")
	if err := writeKubeconfig(managerConfig, server, ca, managerUser, managerToken); err != nil {
		return err
	}
	if err := sup.start(sup.add("controller-manager", self, "controller-manager", "-dir", dir)); err != nil {
		return err
	}
	if schedulerConfig != "" {
		kubeconfig := filepath.Join(dir, "kube-scheduler.kubeconfig")
		if err := writeKubeconfig(kubeconfig, server, ca, schedulerUser, schedulerToken); err != nil {
			return err
		}
		config, err := schedulerConfigFile(schedulerConfig, dir, kubeconfig)
		if err != nil {
			return err
		}
		if err := sup.start(sup.add("kube-scheduler", self, append([]string{"kube-scheduler"},
			schedulerArgs(config)...)...)); err != nil {
			return err
		}
	}
	if kwok != "" {
		args, err := kwokArgs(kwok, dir)
		if err != nil {
			return err
		}
		if err := sup.start(sup.add("kwok", kwok, args...)); err != nil {
			return err
		}
	}
	fmt.Println("ready", server)
	sup.supervise(ctx)
	return nil
}

// writeKubeconfig writes a kubeconfig for user (a bearer token) atomically: a reader never sees half.
func writeKubeconfig(path, server, ca, user, token string) error {
	text := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: hami-test
  cluster: {server: %q, certificate-authority: %q}
users:
- name: %s
  user: {token: %q}
contexts:
- name: hami-test
  context: {cluster: hami-test, user: %s}
current-context: hami-test
`, server, ca, user, token, user)
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// waitHTTP polls url (with a bearer token, if any) until it answers 200, the child exits or the
// timeout passes.
func waitHTTP(ctx context.Context, c *child, url, token string, timeout time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // a loopback test cluster
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-c.run.done:
			return fmt.Errorf("%s exited before it was ready: %v (see %s)", c.name, c.run.err, c.logPath())
		case <-ctx.Done():
			return fmt.Errorf("interrupted while waiting for %s", c.name)
		default:
		}
		req, _ := http.NewRequest("GET", url, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %s (see %s)", c.name, timeout, c.logPath())
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
