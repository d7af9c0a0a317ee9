package qubessim

import "github.com/qcrypt/qcrypt/qubes"

// Dom0 returns the simulated dom0 for luks-init: scripts run in dom0's sandbox (with the
// fake block tools) through runner, and its files are read from dom0's tree.
func (s *Sim) Dom0(runner *qubes.Runner) qubes.RemoteDom0 {
	vm, _ := s.VM("dom0")
	return qubes.RemoteDom0{Runner: runner, Root: vm.root}
}
