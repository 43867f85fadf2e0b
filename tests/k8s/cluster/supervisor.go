// The parent's side of hami-k8s-cluster: children started, started again when they die, stopped in
// reverse order. Fault injection (tests/k8s/chaos_helpers.py) kills a child by the pid in
// <dir>/pids/<name>.pid and waits for a new pid there.
package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

const (
	firstRestartDelay = 100 * time.Millisecond // a SIGKILLed API server is back as fast as it starts
	maxRestartDelay   = 5 * time.Second        // a child that keeps dying does not spin
	stableAfter       = 10 * time.Second       // a child that lived this long starts again at once
	stopGrace         = 20 * time.Second       // SIGTERM, then SIGKILL after this
)

// process is one run of a child: a restart makes a new one.
type process struct {
	cmd     *exec.Cmd
	started time.Time
	done    chan struct{} // closed when the process has exited
	err     error         // its exit status, once done is closed
}

type child struct {
	name  string
	path  string
	args  []string
	dir   string
	run   *process
	delay time.Duration // before the next restart
}

func (c *child) logPath() string { return filepath.Join(c.dir, c.name+".log") }
func (c *child) pidPath() string { return filepath.Join(c.dir, "pids", c.name+".pid") }

type exited struct {
	c *child
	p *process
}

type supervisor struct {
	dir      string
	children []*child
	exits    chan exited
}

func newSupervisor(dir string) *supervisor {
	return &supervisor{dir: dir, exits: make(chan exited, 64)}
}

// add declares a child (started by start, in the order of the calls; stopped in reverse).
func (s *supervisor) add(name, path string, args ...string) *child {
	c := &child{name: name, path: path, args: args, dir: s.dir}
	s.children = append(s.children, c)
	return c
}

// start runs c (again), appending to its log and replacing its pid file. Only the main goroutine
// calls it (see init: Pdeathsig belongs to the thread that forks).
func (s *supervisor) start(c *child) error {
	log, err := os.OpenFile(c.logPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer log.Close()
	fmt.Fprintf(log, "--- %s: hami-k8s-cluster starts %s\n", time.Now().Format(time.RFC3339Nano), c.name)
	cmd := exec.Command(c.path, c.args...)
	cmd.Stdout, cmd.Stderr = log, log
	// a process group of its own: a terminal's Ctrl-C reaches this parent alone, which stops the children
	// in order instead of finding them dead and starting them again
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%s: %w", c.name, err)
	}
	p := &process{cmd: cmd, started: time.Now(), done: make(chan struct{})}
	c.run = p
	go func() {
		p.err = cmd.Wait()
		close(p.done)
		s.exits <- exited{c, p}
	}()
	tmp := c.pidPath() + ".tmp"
	if err := os.WriteFile(tmp, []byte(fmt.Sprintf("%d\n", cmd.Process.Pid)), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, c.pidPath())
}

// supervise starts again every child that exits, until ctx ends: at once after a child that lived
// stableAfter, else with a delay doubling up to maxRestartDelay.
func (s *supervisor) supervise(ctx context.Context) {
	due := make(chan *child)
	later := func(c *child) {
		time.AfterFunc(c.delay, func() {
			select {
			case due <- c:
			case <-ctx.Done():
			}
		})
	}
	for {
		select {
		case <-ctx.Done():
			return
		case e := <-s.exits:
			if e.p != e.c.run {
				continue
			}
			lived := time.Since(e.p.started)
			if lived >= stableAfter || e.c.delay == 0 {
				e.c.delay = firstRestartDelay
			} else {
				e.c.delay = min(2*e.c.delay, maxRestartDelay)
			}
			fmt.Printf("%s: %s (pid %d) exited after %.1f s (%v); starting it again in %s\n",
				time.Now().Format(time.RFC3339), e.c.name, e.p.cmd.Process.Pid, lived.Seconds(), e.p.err, e.c.delay)
			later(e.c)
		case c := <-due:
			if err := s.start(c); err != nil {
				fmt.Printf("%s: starting %s again failed: %v\n", time.Now().Format(time.RFC3339), c.name, err)
				c.delay = min(2*c.delay, maxRestartDelay)
				later(c)
				continue
			}
			fmt.Printf("%s: %s started again (pid %d)\n", time.Now().Format(time.RFC3339), c.name, c.run.cmd.Process.Pid)
		}
	}
}

// stopAll stops the running children in reverse order (kwok and the controller-manager before the API
// server, the API server before etcd): SIGTERM, SIGKILL after stopGrace; their pid files go.
func (s *supervisor) stopAll() {
	for i := len(s.children) - 1; i >= 0; i-- {
		c := s.children[i]
		if c.run == nil {
			continue
		}
		_ = c.run.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.run.done:
		case <-time.After(stopGrace):
			_ = c.run.cmd.Process.Kill()
			<-c.run.done
		}
		_ = os.Remove(c.pidPath())
	}
}
