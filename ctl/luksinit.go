package ctl

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/dbusapi"
	"github.com/qcrypt/qcrypt/qubes"
)

func cmdLuksInit(a *app, p *parsed) error {
	spec, err := p.spec()
	if err != nil {
		return usageErr(err.Error())
	}
	if len(p.values["--inj"]) > 0 {
		return usageErr("--inj is for open: luks-init makes the keys")
	}
	switch store := p.value("--keystore"); store {
	case "":
	case "//": // the original's name for the default store
		spec.Keystore = chains.DefaultKeystoreDir
	default:
		if !strings.HasPrefix(store, "/") {
			return usageErr("--keystore needs the store's directory (an absolute path) or // for " + chains.DefaultKeystoreDir)
		}
		spec.Keystore = store
	}
	if v := p.value("--size"); v != "" {
		n, err := chains.ParseSize(v)
		if err != nil {
			return usageErr("--size: " + err.Error())
		}
		spec.Size = uint64(n)
	}
	if v := p.value("--ks"); v != "" {
		var n uint32
		if _, err := fmt.Sscan(v, &n); err != nil || n == 0 {
			return usageErr("--ks needs a number of bytes")
		}
		spec.KeySize = n
	}
	spec.FS = p.value("--fs")
	api, err := a.client()
	if err != nil {
		return err
	}
	backups, err := a.luksInitFiles(p, &spec)
	if err != nil {
		return err
	}
	if spec.Keystore == "" {
		err = a.job(api, api.LuksInit(spec), p.flags["--json"])
	} else {
		// qcryptd asks for the store's password, or a new one (asked twice here) to create it.
		var st chains.KeystoreState
		if st, err = api.KeystoreStatus(a.ctx, spec.Keystore); err == nil {
			err = a.answeredJob(api, api.LuksInit(spec), !st.Exists, p.flags["--json"])
		}
	}
	if err != nil {
		// The keys these would hold open nothing: no half-made backup stays.
		for _, b := range backups {
			os.Remove(b)
		}
	}
	return err
}

// luksInitFiles opens luks-init's dom0 files with the caller's own rights: entropy
// sources, a work file in --wd (unlinked at once, so nothing is left behind) and new
// backup files in --bak, never overwriting one. It returns the backup paths it made.
func (a *app) luksInitFiles(p *parsed, spec *dbusapi.Spec) ([]string, error) {
	var err error
	if v := p.value("--enkey"); v != "" {
		if spec.KeyEntropy, err = a.open(v, os.O_RDONLY, 0); err != nil {
			return nil, fmt.Errorf("--enkey: %w", err)
		}
	}
	if v := p.value("--encon"); v != "" {
		if spec.ContainerEntropy, err = a.open(v, os.O_RDONLY, 0); err != nil {
			return nil, fmt.Errorf("--encon: %w", err)
		}
	}
	if wd := p.value("--wd"); wd != "" {
		if err := os.MkdirAll(wd, 0o700); err != nil {
			return nil, fmt.Errorf("--wd: %w", err)
		}
		f, err := os.CreateTemp(wd, ".qcrypt-luks-init-*")
		if err != nil {
			return nil, fmt.Errorf("--wd: %w", err)
		}
		a.files = append(a.files, f)
		os.Remove(f.Name())
		spec.Container = f
	}
	var made []string
	if bak := p.value("--bak"); bak != "" {
		// The names become file names here, before qcryptd has seen them.
		if err := chains.ValidateKeyID(spec.Key); err != nil {
			return nil, err
		}
		for _, vm := range spec.Destinations {
			if err := qubes.ValidateMemberName(vm); err != nil {
				return nil, err
			}
		}
		if err := os.MkdirAll(bak, 0o700); err != nil {
			return nil, fmt.Errorf("--bak: %w", err)
		}
		spec.Backups = map[string]*os.File{}
		for _, vm := range spec.Destinations {
			path := filepath.Join(bak, vm+"_"+spec.Key)
			f, err := a.open(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
			if err != nil {
				for _, m := range made {
					os.Remove(m)
				}
				if errors.Is(err, os.ErrExist) {
					return nil, fmt.Errorf("--bak: a key backup exists already (never overwritten): %s", path)
				}
				return nil, fmt.Errorf("--bak: %w", err)
			}
			made = append(made, path)
			spec.Backups[vm] = f
		}
	}
	return made, nil
}
