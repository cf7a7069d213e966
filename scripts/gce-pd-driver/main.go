// Command gce-pd-fake-csi serves the Google Compute Engine Persistent Disk CSI driver
// (pd.csi.storage.gke.io, module sigs.k8s.io/gcp-compute-persistent-disk-csi-driver) on a unix
// socket, with the in-memory GCE that the driver's own package ships instead of Google's API.
//
// Why it exists: issue 5 asks that Berth's provisioning and attach flow pass against a CSI
// driver Berth did not write, installed in CI from a package registry. This driver is the only
// independent CSI driver the Go module proxy serves here (kubernetes-csi's hostpath driver is
// refused, see docs/hostpath-proof.md). It is a test tool of scripts/anydriver-e2e.sh; Berth
// itself stays Rust.
//
// What is fake: the cloud (gce.CreateFakeCloudProvider: disks, instances and snapshots in
// maps), the node's metadata server (project, zone, instance name, machine type) and the
// node's mounter and device utilities. What is the driver's own: the identity, controller and
// node gRPC services: request validation, parameters, topology (topology.gke.io/zone), volume
// and node id formats, attach bookkeeping on the instance, snapshots, expansion, errors and
// their codes.
//
// Usage:
//
//	gce-pd-fake-csi serve -endpoint unix:///run/x/csi.sock [-project P] [-zone Z] [-instance NAME]
//	gce-pd-fake-csi volumes -endpoint unix:///run/x/csi.sock     # CSI ListVolumes, one line a disk
//	gce-pd-fake-csi snapshots -endpoint unix:///run/x/csi.sock   # CSI ListSnapshots
//	gce-pd-fake-csi version                                      # the driver's module version
//
// "volumes" prints "VOLUME_ID NODE_ID,..." (the nodes the disk is attached to, "-" for none):
// a client that asks the driver itself, through CSI, what it holds.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	csi "github.com/container-storage-interface/spec/lib/go/csi"
	compute "google.golang.org/api/compute/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"

	"sigs.k8s.io/gcp-compute-persistent-disk-csi-driver/pkg/common"
	"sigs.k8s.io/gcp-compute-persistent-disk-csi-driver/pkg/deviceutils"
	gce "sigs.k8s.io/gcp-compute-persistent-disk-csi-driver/pkg/gce-cloud-provider/compute"
	driver "sigs.k8s.io/gcp-compute-persistent-disk-csi-driver/pkg/gce-pd-csi-driver"
	mountmanager "sigs.k8s.io/gcp-compute-persistent-disk-csi-driver/pkg/mount-manager"
)

const (
	driverName = "pd.csi.storage.gke.io"
	driverPath = "sigs.k8s.io/gcp-compute-persistent-disk-csi-driver"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: gce-pd-fake-csi serve|volumes|snapshots|version -endpoint unix:///PATH [flags]")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	endpoint := fs.String("endpoint", "", "the CSI socket, unix:///PATH")
	project := fs.String("project", "berth-ci", "the fake GCE project")
	zone := fs.String("zone", "ci-central1-a", "the fake zone this node is in (region-zone form)")
	host, _ := os.Hostname()
	instance := fs.String("instance", host, "the fake instance this node is")
	klog.InitFlags(fs) // -v=N for the driver's own logs
	_ = fs.Parse(os.Args[2:])
	if cmd == "version" {
		fmt.Println(driverVersion())
		return
	}
	path, err := socketPath(*endpoint)
	if err != nil {
		fmt.Fprintf(os.Stderr, "gce-pd-fake-csi: %v\n", err)
		os.Exit(2)
	}
	switch cmd {
	case "serve":
		err = serve(path, *project, *zone, *instance)
	case "volumes", "snapshots":
		err = list(path, cmd)
	default:
		err = fmt.Errorf("unknown command %q (serve, volumes, snapshots)", cmd)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "gce-pd-fake-csi: %v\n", err)
		os.Exit(1)
	}
}

func socketPath(endpoint string) (string, error) {
	u, err := url.Parse(endpoint)
	if err != nil || u.Scheme != "unix" || u.Path == "" {
		return "", fmt.Errorf("-endpoint must be unix:///PATH, got %q", endpoint)
	}
	return u.Path, nil
}

// driverVersion is the driver module's version linked in (v1.28.1), as its release reports it.
func driverVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, m := range info.Deps {
			if m.Path == driverPath {
				return m.Version
			}
		}
	}
	return "unknown"
}

// metadata is the node's metadata server: who and where this node is. NodeGetInfo builds the
// node id projects/P/zones/Z/instances/NAME and the topology segment from it.
type metadata struct{ project, zone, name string }

func (m metadata) GetZone() string        { return m.zone }
func (m metadata) GetProject() string     { return m.project }
func (m metadata) GetName() string        { return m.name }
func (m metadata) GetMachineType() string { return "n2-standard-2" }
func (m metadata) GetValue(_ context.Context, key string) (string, error) {
	return "", fmt.Errorf("the fake metadata server has no %s", key)
}

func serve(path, project, zone, instance string) error {
	cloud, err := gce.CreateFakeCloudProvider(project, zone, nil)
	if err != nil {
		return fmt.Errorf("creating the fake cloud: %w", err)
	}
	// The instance the node id names must exist for ControllerPublishVolume to attach to it.
	// SelfLink is what ListVolumes reads the published node ids from.
	nodeID := common.CreateNodeID(project, zone, instance)
	cloud.InsertInstance(&compute.Instance{
		Name:     instance,
		Zone:     zone,
		SelfLink: gce.BasePath + nodeID,
		Disks:    []*compute.AttachedDisk{},
	}, zone, instance)

	d := driver.GetGCEDriver()
	// The defaults of the driver's own command (cmd/gce-pd-csi-driver): publish backoff 200 ms
	// to 5 min, no fallback zones, no storage pools, no data cache, no multi-zone handles, no
	// dynamic IOPS/throughput, no hyperdisk HA; but ListVolumes reads the published nodes from
	// the instances (its --use-instance-api-to-list-volumes-published-nodes), because the fake
	// cloud records attachments there and not in the disks' users.
	controller := driver.NewControllerServer(d, cloud, 200*time.Millisecond, 5*time.Minute, nil,
		false, false, driver.MultiZoneVolumeHandleConfig{},
		driver.ListVolumesConfig{UseInstancesAPIForPublishedNodes: true},
		driver.ProvisionableDisksConfig{}, false, &driver.GCEControllerServerArgs{})
	mounter := mountmanager.NewFakeSafeMounter()
	node := driver.NewNodeServer(d, mounter, deviceutils.NewFakeDeviceUtils(false),
		metadata{project, zone, instance}, mountmanager.NewFakeStatter(mounter),
		&driver.NodeServerArgs{EnableDeviceInUseCheck: true, DeviceInUseTimeout: 30 * time.Second})
	identity := driver.NewIdentityServer(d)
	if err := d.SetupGCEDriver(driverName, driverVersion(), nil, nil, identity, controller, node); err != nil {
		return fmt.Errorf("setting up the driver: %w", err)
	}

	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return err
	}
	lis, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return err
	}
	// The driver's own gRPC server (driver.Run) is not used: the fake cloud keeps its disks
	// in plain maps without a lock (Google's API is the real one's lock), so every call is
	// served one at a time here. Each call is logged with its outcome.
	var one sync.Mutex
	srv := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		one.Lock()
		defer one.Unlock()
		resp, err := h(ctx, req)
		klog.Infof("%s %s -> %s", info.FullMethod, summary(req), outcome(resp, err))
		return resp, err
	}))
	csi.RegisterIdentityServer(srv, identity)
	csi.RegisterControllerServer(srv, controller)
	csi.RegisterNodeServer(srv, node)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-stop
		srv.Stop()
	}()
	klog.Infof("serving %s %s on %s (fake GCE: project %s, zone %s, instance %s, node id %s)",
		driverName, driverVersion(), path, project, zone, instance, nodeID)
	err = srv.Serve(lis)
	_ = os.Remove(path)
	return err
}

// summary names what a request is about, for the call log (no secrets: CSI secrets are not
// printed).
func summary(req any) string {
	var parts []string
	if r, ok := req.(interface{ GetName() string }); ok && r.GetName() != "" {
		parts = append(parts, "name="+r.GetName())
	}
	if r, ok := req.(interface{ GetVolumeId() string }); ok && r.GetVolumeId() != "" {
		parts = append(parts, "volume="+r.GetVolumeId())
	}
	if r, ok := req.(interface{ GetNodeId() string }); ok && r.GetNodeId() != "" {
		parts = append(parts, "node="+r.GetNodeId())
	}
	if r, ok := req.(interface{ GetSnapshotId() string }); ok && r.GetSnapshotId() != "" {
		parts = append(parts, "snapshot="+r.GetSnapshotId())
	}
	if r, ok := req.(interface{ GetSourceVolumeId() string }); ok && r.GetSourceVolumeId() != "" {
		parts = append(parts, "source="+r.GetSourceVolumeId())
	}
	switch r := req.(type) {
	case *csi.CreateVolumeRequest:
		parts = append(parts, fmt.Sprintf("bytes=%d requisite=%s", r.GetCapacityRange().GetRequiredBytes(),
			segments(r.GetAccessibilityRequirements().GetRequisite())))
		if s := r.GetVolumeContentSource().GetSnapshot(); s != nil {
			parts = append(parts, "from-snapshot="+s.GetSnapshotId())
		}
		if v := r.GetVolumeContentSource().GetVolume(); v != nil {
			parts = append(parts, "from-volume="+v.GetVolumeId())
		}
	case *csi.ControllerExpandVolumeRequest:
		parts = append(parts, fmt.Sprintf("bytes=%d", r.GetCapacityRange().GetRequiredBytes()))
	}
	return strings.Join(parts, " ")
}

// segments prints topologies as [k=v,...;...].
func segments(tops []*csi.Topology) string {
	var out []string
	for _, t := range tops {
		var kv []string
		for k, v := range t.GetSegments() {
			kv = append(kv, k+"="+v)
		}
		sort.Strings(kv)
		out = append(out, strings.Join(kv, ","))
	}
	return "[" + strings.Join(out, ";") + "]"
}

func outcome(resp any, err error) string {
	if err != nil {
		return "error " + status.Convert(err).Code().String() + ": " + status.Convert(err).Message()
	}
	switch r := resp.(type) {
	case *csi.CreateVolumeResponse:
		return fmt.Sprintf("OK volume=%s bytes=%d topology=%s", r.GetVolume().GetVolumeId(),
			r.GetVolume().GetCapacityBytes(), segments(r.GetVolume().GetAccessibleTopology()))
	case *csi.NodeGetInfoResponse:
		return fmt.Sprintf("OK node=%s max_volumes=%d topology=%s", r.GetNodeId(), r.GetMaxVolumesPerNode(),
			segments([]*csi.Topology{r.GetAccessibleTopology()}))
	case *csi.ControllerExpandVolumeResponse:
		return fmt.Sprintf("OK bytes=%d node_expansion_required=%t", r.GetCapacityBytes(), r.GetNodeExpansionRequired())
	case *csi.CreateSnapshotResponse:
		return fmt.Sprintf("OK snapshot=%s bytes=%d ready=%t", r.GetSnapshot().GetSnapshotId(),
			r.GetSnapshot().GetSizeBytes(), r.GetSnapshot().GetReadyToUse())
	}
	return "OK"
}

// list asks the driver, through CSI, what it holds, one line an object, sorted.
func list(path, what string) error {
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := csi.NewControllerClient(conn)
	var lines []string
	token := ""
	for {
		switch what {
		case "volumes":
			r, err := c.ListVolumes(ctx, &csi.ListVolumesRequest{StartingToken: token})
			if err != nil {
				return fmt.Errorf("ListVolumes: %w", err)
			}
			for _, e := range r.GetEntries() {
				var nodes []string
				for _, n := range e.GetStatus().GetPublishedNodeIds() {
					if n != "" {
						nodes = append(nodes, n)
					}
				}
				if len(nodes) == 0 {
					nodes = []string{"-"}
				}
				lines = append(lines, e.GetVolume().GetVolumeId()+" "+strings.Join(nodes, ","))
			}
			token = r.GetNextToken()
		case "snapshots":
			r, err := c.ListSnapshots(ctx, &csi.ListSnapshotsRequest{StartingToken: token})
			if err != nil {
				return fmt.Errorf("ListSnapshots: %w", err)
			}
			for _, e := range r.GetEntries() {
				s := e.GetSnapshot()
				lines = append(lines, fmt.Sprintf("%s %s %t", s.GetSnapshotId(), s.GetSourceVolumeId(), s.GetReadyToUse()))
			}
			token = r.GetNextToken()
		}
		if token == "" {
			break
		}
	}
	sort.Strings(lines)
	for _, l := range lines {
		fmt.Println(l)
	}
	return nil
}
