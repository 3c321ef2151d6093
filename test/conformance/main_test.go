// Conformance check: containerd's own snapshotter test suite (snapshots/testsuite), driven through
// containerd's proxy snapshotter client against stargaze's gRPC service on a unix socket.
//
// Two ways to point it at a daemon:
//
//	STARGAZE_SERVE="node /path/dist/test/conformance/serve.js"  start one daemon per test case on the
//	    root the suite hands out (the suite's own isolation model: a fresh snapshotter per case);
//	STARGAZE_SOCKET=/path/to.sock  use one long-running daemon for every case.
//
// Run by script/conformance.sh in GOPATH mode against Debian's Go packages.
package conformance

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/pkg/dialer"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

// daemonStartTimeout bounds how long a per-case daemon may take to create its socket.
const daemonStartTimeout = 20 * time.Second

// dial connects the way containerd connects to a proxy plugin (services/server: dialer.DialAddress and
// dialer.ContextDialer), so the HTTP/2 :authority and framing are what a real containerd sends.
func dial(ctx context.Context, socket string) (*grpc.ClientConn, error) {
	return grpc.DialContext(ctx, dialer.DialAddress(socket),
		grpc.WithInsecure(), // Debian's grpc predates credentials/insecure
		grpc.WithContextDialer(dialer.ContextDialer),
		grpc.WithBlock())
}

func waitForSocket(path string, exited <-chan error) error {
	deadline := time.Now().Add(daemonStartTimeout)
	for time.Now().Before(deadline) {
		if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
			return nil
		}
		select {
		case err := <-exited:
			return fmt.Errorf("daemon exited before listening: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("daemon did not create %s within %v", path, daemonStartTimeout)
}

// perCaseDaemon starts `serve` with the case's root and returns a proxy snapshotter bound to it.
func perCaseDaemon(serve string) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		socket := filepath.Join(filepath.Dir(root), "stargaze.sock")
		argv := strings.Fields(serve)
		argv = append(argv, "--root", root, "--address", socket)
		cmd := exec.Command(argv[0], argv[1:]...)
		logFile, err := os.Create(filepath.Join(filepath.Dir(root), "daemon.log"))
		if err != nil {
			return nil, nil, err
		}
		cmd.Stdout = logFile
		cmd.Stderr = logFile
		if err := cmd.Start(); err != nil {
			logFile.Close()
			return nil, nil, err
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		stop := func() error {
			_ = cmd.Process.Signal(os.Interrupt)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
			return logFile.Close()
		}
		if err := waitForSocket(socket, exited); err != nil {
			_ = stop()
			return nil, nil, err
		}
		dctx, cancel := context.WithTimeout(ctx, daemonStartTimeout)
		defer cancel()
		conn, err := dial(dctx, socket)
		if err != nil {
			_ = stop()
			return nil, nil, err
		}
		sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "stargaze")
		return sn, func() error {
			cerr := conn.Close()
			if err := stop(); err != nil {
				return err
			}
			return cerr
		}, nil
	}
}

// sharedDaemon returns proxy snapshotters bound to one already running daemon.
func sharedDaemon(socket string) testsuite.SnapshotterFunc {
	return func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		dctx, cancel := context.WithTimeout(ctx, daemonStartTimeout)
		defer cancel()
		conn, err := dial(dctx, socket)
		if err != nil {
			return nil, nil, err
		}
		return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "stargaze"), conn.Close, nil
	}
}

func TestStargazeSnapshotter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("the snapshotter suite mounts overlayfs: needs root")
	}
	if serve := os.Getenv("STARGAZE_SERVE"); serve != "" {
		testsuite.SnapshotterSuite(t, "Stargaze", perCaseDaemon(serve))
		return
	}
	socket := os.Getenv("STARGAZE_SOCKET")
	if socket == "" {
		t.Skip("set STARGAZE_SERVE or STARGAZE_SOCKET (see script/conformance.sh)")
	}
	testsuite.SnapshotterSuite(t, "Stargaze", sharedDaemon(socket))
}
