package qubessim

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/qcrypt/qcrypt/qubes"
	"github.com/qcrypt/qcrypt/qubessim/inqube"
)

// The kernel backend runs qubes on the real kernel (root, loop and dm-crypt needed):
// each running qube is a holder process in its own mount, UTS, IPC and network
// namespaces with its own root tree and a private /dev, and commands enter those
// namespaces with nsenter, so the real losetup, cryptsetup, mkfs and mount act and their
// mounts persist between commands as in a real qube. What Xen would do is done with
// device-mapper in the simulator: an attached device is a dm-linear map of the backend's
// device, shown to the frontend as /dev/xvdX; a plugged USB disk is a loop device over
// the image, shown in the qube as /dev/sdX.
//
// Device-mapper names are global in one kernel, so a qube's `cryptsetup` is a wrapper
// (CryptsetupWrapper) that names its maps "QUBE:NAME" and shows the plain NAME inside
// the qube; attachment maps are named "att#FRONTEND#xvdX" ('#' is not in qube names).

const teardownLimit = 10 * time.Second

// hostKernel is the kernel backend's state; every method runs with World.mu held.
type hostKernel struct {
	w       *World
	binary  string // qubes-sim, run as the holder
	tools   string // host directory bound at inqube.ToolsDir in every qube
	holders map[string]*holder
	disks   map[qubes.DeviceRef]*hostDisk
	maps    map[*Attachment]string // attachment -> its dm-linear map
	seen    map[string]map[string]devInfo
}

type holder struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// hostDisk is a plugged image: a host loop device the qube sees as sdX.
type hostDisk struct {
	loop  string // loopN; read-only comes from its sysfs flag
	desc  string
	links []string // /dev paths inside the qube
}

func newHostKernel(w *World, binary, tools string) (*hostKernel, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("cannot use the kernel backend: it needs root")
	}
	for _, p := range []string{"/dev/mapper/control", "/dev/loop-control"} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("cannot use the kernel backend: %w (modprobe dm_mod loop)", err)
		}
	}
	for _, t := range []string{"nsenter", "dmsetup", "losetup", "blkid", "cryptsetup"} {
		if _, err := exec.LookPath(t); err != nil {
			return nil, fmt.Errorf("cannot use the kernel backend: %w", err)
		}
	}
	if err := os.MkdirAll(tools, 0o755); err != nil {
		return nil, err
	}
	if err := linkBinary(binary, filepath.Join(tools, "qubes-sim")); err != nil {
		return nil, err
	}
	for _, wrapped := range []string{"cryptsetup", "dmsetup"} {
		os.Remove(filepath.Join(tools, wrapped))
		if err := os.Symlink("qubes-sim", filepath.Join(tools, wrapped)); err != nil {
			return nil, err
		}
	}
	return &hostKernel{w: w, binary: binary, tools: tools, holders: map[string]*holder{},
		disks: map[qubes.DeviceRef]*hostDisk{}, maps: map[*Attachment]string{}, seen: map[string]map[string]devInfo{}}, nil
}

// boot starts the qube's holder and waits until its root is ready.
func (hk *hostKernel) boot(vm *VM) error {
	cmd := exec.Command(hk.binary, "qube-holder", vm.root, hk.tools, vm.Name)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC | syscall.CLONE_NEWNET,
		Setpgid:    true, Pdeathsig: syscall.SIGKILL,
	}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	var errBuf strings.Builder
	cmd.Stderr = &errBuf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("cannot start qube %s: %w", vm.Name, err)
	}
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(out).ReadString('\n')
		if err == nil && line != "ready\n" {
			err = fmt.Errorf("unexpected %q", line)
		}
		ready <- err
	}()
	select {
	case err = <-ready:
	case <-time.After(20 * time.Second):
		err = errors.New("timed out")
	}
	if err != nil {
		cmd.Process.Kill()
		_ = cmd.Wait() // killed: its status says nothing
		return fmt.Errorf("cannot set up qube %s: %w: %s", vm.Name, err, strings.TrimSpace(errBuf.String()))
	}
	hk.holders[vm.Name] = &holder{cmd: cmd, stdin: stdin}
	hk.seen[vm.Name] = map[string]devInfo{}
	return nil
}

// root is the qube's "/" as the simulator reaches it.
func (hk *hostKernel) root(vm string) string {
	if h, ok := hk.holders[vm]; ok {
		return fmt.Sprintf("/proc/%d/root", h.cmd.Process.Pid)
	}
	return ""
}

// command runs argv as root inside the qube with home as working directory.
func (hk *hostKernel) command(vm *VM, home string, argv []string) *exec.Cmd {
	h := hk.holders[vm.Name]
	args := append([]string{"--target", strconv.Itoa(h.cmd.Process.Pid), "--mount", "--uts", "--ipc", "--net", "--root",
		"--", "/bin/sh", "-c", `cd "$HOME" 2>/dev/null || cd /; exec "$@"`, "qube"}, argv...)
	cmd := exec.Command("nsenter", args...)
	cmd.Env = []string{
		"PATH=" + inqube.ToolsDir + ":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=" + home, "USER=root", "LANG=C.UTF-8", "DM_DISABLE_UDEV=1",
		inqube.MapperPrefixEnv + "=" + vm.Name, "QUBES_SIM_VM=" + vm.Name,
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

// devices lists what the qube publishes: its plugged disks, the loop devices whose
// backing file is in its file system and its device-mapper devices.
func (hk *hostKernel) devices(vm string) []devInfo {
	var out []devInfo
	diskLoops := map[string]bool{} // the simulator's own loop devices under plugged disks
	for ref, d := range hk.disks {
		diskLoops[d.loop] = true
		if ref.Backend == vm {
			if info, ok := sysDev(d.loop); ok {
				info.name, info.desc = ref.Port, d.desc
				out = append(out, info)
			}
		}
	}
	root := hk.root(vm)
	if root == "" {
		return nil
	}
	loops, _ := filepath.Glob("/sys/block/loop*")
	for _, p := range loops {
		name := filepath.Base(p)
		backing, err := os.ReadFile(p + "/loop/backing_file")
		if err != nil || diskLoops[name] {
			continue
		}
		file := strings.TrimSuffix(string(backing), "\n")
		if !loopBackedBy(name, filepath.Join(root, file)) {
			continue
		}
		if info, ok := sysDev(name); ok {
			info.desc = file
			out = append(out, info)
		}
	}
	dms, _ := filepath.Glob("/sys/block/dm-*")
	for _, p := range dms {
		raw, err := os.ReadFile(p + "/dm/name")
		owner, mapper, ok := strings.Cut(strings.TrimSpace(string(raw)), ":")
		if err != nil || !ok || owner != vm || strings.Contains(owner, "#") {
			continue
		}
		if info, ok := sysDev(filepath.Base(p)); ok {
			info.desc = mapper
			out = append(out, info)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].name < out[j].name })
	return out
}

// added: a qube's namespaces are made when it boots.
func (hk *hostKernel) added(*VM) error { return nil }

// exposed lists the block devices a running qube exposes.
func (hk *hostKernel) exposed(vm *VM) []devInfo { return hk.devices(vm.Name) }

// commandDone: what a command did to the qube's block devices reaches qubesd as its
// udev would report it.
func (hk *hostKernel) commandDone(vm *VM) {
	if vm.running() {
		hk.refresh(vm)
	}
}

// refresh publishes device changes of a qube as qubesd events, as its udev would.
func (hk *hostKernel) refresh(vm *VM) {
	seen, ok := hk.seen[vm.Name]
	if !ok {
		return
	}
	now := map[string]devInfo{}
	for _, d := range hk.devices(vm.Name) {
		now[d.name] = d
		if _, had := seen[d.name]; !had {
			hk.w.deviceAdded(vm)
		}
	}
	for name := range seen {
		if _, has := now[name]; !has {
			hk.w.deviceRemoved(vm, name)
		}
	}
	hk.seen[vm.Name] = now
}

// attach gives the frontend /dev/FRONTEND_DEV over the backend's device.
func (hk *hostKernel) attach(a *Attachment, dev devInfo) error {
	name := inqube.AttachMapPrefix + a.Frontend + "#" + a.FrontendDev
	args := []string{"create", name, "--table", fmt.Sprintf("0 %d linear %d:%d 0", dev.size/512, dev.major, dev.minor)}
	if a.ReadOnly {
		args = append(args, "--readonly")
	}
	if err := dmsetup(args...); err != nil {
		return err
	}
	info, ok := mapperDev(name)
	if ok {
		ok = info.sys().Mknod(filepath.Join(hk.root(a.Frontend), "dev", a.FrontendDev)) == nil
	}
	if !ok {
		_ = dmsetup("remove", name) // undo; the error below is what matters
		return fmt.Errorf("cannot give %s its %s", a.Frontend, a.FrontendDev)
	}
	hk.maps[a] = name
	return nil
}

// detach removes the frontend's device; Xen refuses while the frontend uses it.
func (hk *hostKernel) detach(a *Attachment) error {
	name, ok := hk.maps[a]
	if !ok {
		return nil
	}
	// The kernel refuses to remove a map that is open ("Device or resource busy").
	if err := dmsetup("remove", name); err != nil {
		return err
	}
	os.Remove(filepath.Join(hk.root(a.Frontend), "dev", a.FrontendDev))
	delete(hk.maps, a)
	return nil
}

// teardown ends a qube: what its kernel held goes (its mounts with its namespaces, then
// its dm and loop devices), frontends of its devices get I/O errors like a dead Xen
// backend, its own frontend devices and plugged disks are removed. A shutdown and a kill
// end alike: the real kernel writes a file system's cache back either way.
func (hk *hostKernel) teardown(vm *VM, _ bool) {
	h, ok := hk.holders[vm.Name]
	if !ok {
		return
	}
	owned := hk.devices(vm.Name)
	for a, name := range hk.maps {
		if a.Backend == vm.Name {
			failMapping(name)
		}
	}
	h.stdin.Close()
	h.cmd.Process.Kill()
	_ = h.cmd.Wait() // killed: its status says nothing
	delete(hk.holders, vm.Name)
	delete(hk.seen, vm.Name)
	// The namespaces are gone once the last process left; their mounts are released
	// shortly after, so the removals retry for a while.
	deadline := time.Now().Add(teardownLimit)
	for {
		left := 0
		for i := len(owned) - 1; i >= 0; i-- {
			d := owned[i]
			switch {
			case strings.HasPrefix(d.name, "dm-"):
				if _, err := os.Stat("/sys/block/" + d.name); err == nil && dmsetup("remove", vm.Name+":"+d.desc) != nil {
					left++
				}
			case strings.HasPrefix(d.name, "loop"):
				_ = exec.Command("losetup", "-d", "/dev/"+d.name).Run() // a busy one goes with its last user
			}
		}
		for a, name := range hk.maps {
			if a.Frontend == vm.Name {
				if dmsetup("remove", name) != nil {
					left++
					continue
				}
				delete(hk.maps, a)
			}
		}
		if left == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	for ref, d := range hk.disks {
		if ref.Backend == vm.Name {
			_ = exec.Command("losetup", "-d", "/dev/"+d.loop).Run() // a busy one goes with its last user
			delete(hk.disks, ref)
		}
	}
}

// plug sets up a loop device over image and shows it in the qube as sdX with its
// /dev/disk/by-uuid and by-label links.
func (hk *hostKernel) plug(vm *VM, image, desc string, ro bool) (string, error) {
	used := map[string]bool{}
	for ref := range hk.disks {
		if ref.Backend == vm.Name {
			used[ref.Port] = true
		}
	}
	port := ""
	for c := 'a'; c <= 'z' && port == ""; c++ {
		if !used["sd"+string(c)] {
			port = "sd" + string(c)
		}
	}
	if port == "" {
		return "", errors.New("cannot plug: no free sdX name")
	}
	args := []string{"-f", "--show"}
	if ro {
		args = append(args, "-r")
	}
	out, err := exec.Command("losetup", append(args, image)...).Output()
	if err != nil {
		return "", fmt.Errorf("cannot plug %s: losetup: %w", image, err)
	}
	loop := strings.TrimPrefix(strings.TrimSpace(string(out)), "/dev/")
	info, ok := sysDev(loop)
	root := hk.root(vm.Name)
	if !ok || info.sys().Mknod(filepath.Join(root, "dev", port)) != nil {
		_ = exec.Command("losetup", "-d", "/dev/"+loop).Run() // undo; the error below is what matters
		return "", fmt.Errorf("cannot plug %s into %s", image, vm.Name)
	}
	d := &hostDisk{loop: loop}
	// blkid reads the image: what it reports is as untrusted as the disk; only plain
	// tokens become links.
	props := map[string]string{}
	if out, err := exec.Command("blkid", "-p", "-o", "export", image).Output(); err == nil {
		for _, line := range strings.Split(string(out), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				props[k] = v
			}
		}
	}
	for kind, val := range map[string]string{"by-uuid": props["UUID"], "by-label": props["LABEL"]} {
		if inqube.SafeLinkName(val) {
			link := "/dev/disk/" + kind + "/" + val
			if os.Symlink("../../"+port, filepath.Join(root, link)) == nil {
				d.links = append(d.links, link)
			}
		}
	}
	if desc == "" {
		desc = "QEMU_HARDDISK"
		if props["LABEL"] != "" {
			desc += " (" + props["LABEL"] + ")"
		}
	}
	d.desc = desc
	hk.disks[qubes.DeviceRef{Backend: vm.Name, Port: port}] = d
	hk.refresh(vm)
	return port, nil
}

// unplug pulls the disk out; frontends of it get I/O errors.
func (hk *hostKernel) unplug(vm *VM, port string) error {
	ref := qubes.DeviceRef{Backend: vm.Name, Port: port}
	d, ok := hk.disks[ref]
	if !ok {
		return fmt.Errorf("cannot unplug %s:%s: no such disk", vm.Name, port)
	}
	for a, name := range hk.maps {
		if a.DeviceRef == ref {
			failMapping(name)
		}
	}
	root := hk.root(vm.Name)
	os.Remove(filepath.Join(root, "dev", port))
	for _, l := range d.links {
		os.Remove(filepath.Join(root, l))
	}
	// A mount of it in the qube keeps the loop device until unmounted: autoclear.
	_ = exec.Command("losetup", "-d", "/dev/"+d.loop).Run()
	delete(hk.disks, ref)
	hk.refresh(vm)
	return nil
}
