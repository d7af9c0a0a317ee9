package e2e_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/qcrypt/qcrypt/chains"
	"github.com/qcrypt/qcrypt/qubes"
)

// TestKeystore: the blib key store on the real kernel, in dom0 (here: the machine the
// tests run on). A store made the original's way (blib's createLuks and keys add, done
// here with the real tools: the password as a here-string, cryptsetup's defaults, ext4,
// qcrypt/QUBE_KEY.key) refuses a wrong password and changes nothing, unlocks with the
// right one, serves its key and stays read-only; keys added here are read back by the
// original's way; a store the original has open and mounted is used without a password
// and not closed under it; a store created here is opened the original's way. Nothing
// is left open.
func TestKeystore(t *testing.T) {
	ctx := context.Background()
	runner := qubes.NewRunner(nil)
	runner.Timeout = 5 * time.Minute
	mounts := t.TempDir()
	e := &chains.Engine{Dom0: qubes.LocalDom0{Runner: runner}, KeystoreMounts: mounts}
	const password = "correct horse battery"
	state := func(t *testing.T, k chains.Keystore) chains.KeystoreState {
		t.Helper()
		st, err := e.KeystoreStatus(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	lock := func(t *testing.T, k chains.Keystore) {
		t.Helper()
		if err := e.KeystoreLock(ctx, k); err != nil {
			t.Fatal(err)
		}
		if st := state(t, k); st.Open || st.Unlocked {
			t.Fatalf("after lock: %+v", st)
		}
	}

	t.Run("a store the original made", func(t *testing.T) {
		k := chains.Keystore{Dir: filepath.Join(t.TempDir(), "keys")}
		defer func() { _ = e.KeystoreLock(ctx, k) }()
		originalMakeStore(t, k.Dir, password, "", map[string][]byte{"work_vault.key": []byte("the key of work")})

		if err := e.KeystoreUnlock(ctx, k, []byte("wrong password")); !errors.Is(err, chains.ErrWrongPassword) {
			t.Fatalf("a wrong password: %v", err)
		}
		if st := state(t, k); !st.Exists || st.Open || st.Unlocked {
			t.Fatalf("after a wrong password: %+v", st)
		}
		if _, err := e.KeystoreKey(ctx, k, "work", "vault"); !errors.Is(err, chains.ErrKeystoreLocked) {
			t.Errorf("a key of a locked store: %v", err)
		}
		if err := e.KeystoreUnlock(ctx, k, []byte(password)); err != nil {
			t.Fatal(err)
		}
		if st := state(t, k); !st.Open || !st.Unlocked {
			t.Fatalf("after unlock: %+v", st)
		}
		key, err := e.KeystoreKey(ctx, k, "work", "vault")
		if err != nil || string(key) != "the key of work" {
			t.Fatalf("key: %q %v", key, err)
		}
		if _, err := e.KeystoreKey(ctx, k, "mediator", "vault"); !errors.Is(err, chains.ErrKeystoreNoKey) {
			t.Errorf("a missing key: %v", err)
		}
		mnt := filepath.Join(mounts, k.MapperName())
		if err := os.WriteFile(filepath.Join(mnt, "qcrypt", "x.key"), []byte("x"), 0o600); err == nil {
			t.Error("the unlocked store is writable")
		}

		added := map[string][]byte{"mediator": []byte("key one\x00\xff"), "work": bytes.Repeat([]byte{7}, 4096)}
		if err := e.KeystoreAdd(ctx, k, "other", added); err != nil {
			t.Fatal(err)
		}
		if err := e.KeystoreAdd(ctx, k, "other", map[string][]byte{"sys-usb": []byte("new"), "work": []byte("again")}); !errors.Is(err, chains.ErrKeystoreHasKey) {
			t.Errorf("adding a key that is there: %v", err)
		}
		if _, err := os.Stat(filepath.Join(mnt, "qcrypt", "sys-usb_other.key")); err == nil {
			t.Error("a refused add wrote a key")
		}
		if err := os.WriteFile(filepath.Join(mnt, "qcrypt", "x.key"), []byte("x"), 0o600); err == nil {
			t.Error("the store stayed writable after the add")
		}
		lock(t, k)
		if got := originalReadKey(t, k.Dir, password, "mediator_other.key"); string(got) != string(added["mediator"]) {
			t.Errorf("the original reads %q, want %q", got, added["mediator"])
		}
	})

	t.Run("a store the original has open", func(t *testing.T) {
		k := chains.Keystore{Dir: filepath.Join(t.TempDir(), "keys")}
		defer func() { _ = e.KeystoreLock(ctx, k) }()
		if err := e.KeystoreInit(ctx, k, []byte(password)); err != nil {
			t.Fatal(err)
		}
		if err := e.KeystoreAdd(ctx, k, "vault", map[string][]byte{"work": []byte("k")}); err != nil {
			t.Fatal(err)
		}
		lock(t, k)
		// As blib leaves it: open, mounted read-write at DIR/mnt/rw.
		original(t, `mkdir -p "$1/mnt/rw"
cryptsetup --type luks open "$1/keys.lks" "$3" <<< "$2"
mount "/dev/mapper/$3" "$1/mnt/rw"`, k.Dir, password, k.MapperName())
		defer func() { _ = exec.Command("umount", filepath.Join(k.Dir, "mnt", "rw")).Run() }()
		// Open, not mounted for qcryptd (as after its restart): a key is read all the same.
		if key, err := e.KeystoreKey(ctx, k, "work", "vault"); err != nil || string(key) != "k" {
			t.Errorf("key of a store open already: %q %v", key, err)
		}
		if st := state(t, k); !st.Unlocked {
			t.Errorf("after reading a key of an open store: %+v", st)
		}
		if err := e.KeystoreUnlock(ctx, k, nil); err != nil {
			t.Fatalf("unlock of a store open already, without a password: %v", err)
		}
		if err := os.WriteFile(filepath.Join(mounts, k.MapperName(), "qcrypt", "x.key"), []byte("x"), 0o600); err == nil {
			t.Error("the store is writable through qcryptd's mount")
		}
		if err := e.KeystoreAdd(ctx, k, "vault", map[string][]byte{"mediator": []byte("m")}); err != nil {
			t.Errorf("add while the original has it open: %v", err)
		}
		if err := e.KeystoreLock(ctx, k); err == nil {
			t.Error("closing a store the original has mounted succeeded")
		}
		if err := exec.Command("umount", filepath.Join(k.Dir, "mnt", "rw")).Run(); err != nil {
			t.Fatal(err)
		}
		lock(t, k)
		if err := e.KeystoreUnlock(ctx, k, nil); !errors.Is(err, chains.ErrKeystoreLocked) {
			t.Errorf("unlock of a closed store without a password: %v", err)
		}
	})

	t.Run("a store made here", func(t *testing.T) {
		k := chains.Keystore{Dir: filepath.Join(t.TempDir(), "new", "keys")}
		defer func() { _ = e.KeystoreLock(ctx, k) }()
		if err := e.KeystoreInit(ctx, k, []byte(password)); err != nil {
			t.Fatal(err)
		}
		if st := state(t, k); !st.Unlocked {
			t.Fatalf("after init: %+v", st)
		}
		if err := e.KeystoreInit(ctx, k, []byte("another")); !errors.Is(err, chains.ErrKeystoreExists) {
			t.Errorf("init over a store: %v", err)
		}
		if err := e.KeystoreAdd(ctx, k, "vault", map[string][]byte{"work": []byte("k")}); err != nil {
			t.Fatal(err)
		}
		lock(t, k)
		if err := e.KeystoreUnlock(ctx, k, []byte(password)); err != nil {
			t.Fatal(err)
		}
		if key, err := e.KeystoreKey(ctx, k, "work", "vault"); err != nil || string(key) != "k" {
			t.Errorf("key after relock: %q %v", key, err)
		}
		lock(t, k)
		if info, err := os.Stat(k.Container()); err != nil || info.Size() != 20<<20 {
			t.Errorf("the container: %v %v", info, err)
		}
		if got := string(originalReadKey(t, k.Dir, password, "work_vault.key")); got != "k" {
			t.Errorf("the original reads %q", got)
		}
	})
}

// The original's key store, made and read as blib does with the real tools: the
// password as a here-string, LUKS with cryptsetup's defaults (plus formatOpts), ext4,
// mounted at DIR/mnt/rw, blib's mapper name.

// original runs a bash script (set -e) with args and fails the test when it fails.
func original(t *testing.T, script string, args ...string) string {
	t.Helper()
	cmd := exec.Command("bash", append([]string{"-c", "set -e\n" + script, "bash"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the original's way: %v\n%s", err, out)
	}
	return string(out)
}

// originalMakeStore makes a store in dir holding keys (file name in qcrypt/ -> key).
func originalMakeStore(t *testing.T, dir, password, formatOpts string, keys map[string][]byte) {
	t.Helper()
	mapper := chains.Keystore{Dir: dir}.MapperName()
	original(t, `mkdir -p "$1/mnt/rw"
head -c 20M < /dev/urandom > "$1/keys.lks"
cryptsetup -q luksFormat $4 "$1/keys.lks" <<< "$2"
cryptsetup --type luks open "$1/keys.lks" "$3" <<< "$2"
mkfs -t ext4 "/dev/mapper/$3" > /dev/null 2>&1
mount "/dev/mapper/$3" "$1/mnt/rw"
mkdir -p "$1/mnt/rw/qcrypt"`, dir, password, mapper, formatOpts)
	var werr error
	for name, key := range keys {
		if err := os.WriteFile(filepath.Join(dir, "mnt/rw/qcrypt", name), key, 0o600); err != nil {
			werr = err
		}
	}
	original(t, `umount "$1/mnt/rw"; cryptsetup close "$2"`, dir, mapper)
	if werr != nil {
		t.Fatal(werr)
	}
}

// withOriginalStore opens the store in dir with password, mounts it read-only, calls
// f with its root and closes it again.
func withOriginalStore(t *testing.T, dir, password string, f func(root string)) {
	t.Helper()
	mapper := chains.Keystore{Dir: dir}.MapperName()
	original(t, `mkdir -p "$1/mnt/rw"
cryptsetup --type luks open "$1/keys.lks" "$3" <<< "$2"
mount -o ro "/dev/mapper/$3" "$1/mnt/rw"`, dir, password, mapper)
	defer original(t, `umount "$1/mnt/rw"; cryptsetup close "$2"`, dir, mapper)
	f(filepath.Join(dir, "mnt/rw"))
}

// originalReadKey reads qcrypt/name from the store in dir the original's way.
func originalReadKey(t *testing.T, dir, password, name string) []byte {
	t.Helper()
	var key []byte
	var err error
	withOriginalStore(t, dir, password, func(root string) { key, err = os.ReadFile(filepath.Join(root, "qcrypt", name)) })
	if err != nil {
		t.Fatalf("the original's way: %v", err)
	}
	return key
}
