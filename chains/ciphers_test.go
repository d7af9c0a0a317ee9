package chains

import (
	"strings"
	"testing"

	"github.com/qcrypt/qcrypt/qubessim"
)

// What a qube reports of a layer is read strictly and held against the list: the
// kernel's spellings count as cryptsetup's, and nothing that does not encrypt passes,
// whatever its spelling.
func TestCheckCiphers(t *testing.T) {
	t.Parallel()
	tests := map[string]struct {
		report string
		list   []string
		want   string // "" = allowed
	}{
		"aes-xts with a 512-bit key":       {" crypt/aes-xts-plain64/512", DefaultCiphers, ""},
		"aes-xts with a 256-bit key":       {" crypt/aes-xts-plain64/256", DefaultCiphers, ""},
		"the kernel's spelling":            {" crypt/capi:xts(aes)-plain64/512", DefaultCiphers, ""},
		"adiantum as the kernel spells it": {" crypt/capi:adiantum(xchacha12,aes)-plain64/256", DefaultCiphers, ""},
		"a key too small":                  {" crypt/aes-xts-plain64/128", DefaultCiphers, "with a 128-bit key"},
		"the null cipher":                  {" crypt/cipher_null-ecb/0", DefaultCiphers, `uses cipher_null-ecb`},
		"the null cipher, kernel spelling": {" crypt/capi:ecb(cipher_null)/0", DefaultCiphers, "uses capi:ecb(cipher_null)"},
		"ECB":                              {" crypt/aes-ecb/256", DefaultCiphers, "uses aes-ecb"},
		"CBC, not listed":                  {" crypt/aes-cbc-essiv:sha256/256", DefaultCiphers, "uses aes-cbc-essiv:sha256"},
		"CBC, listed for this chain":       {" crypt/aes-cbc-essiv:sha256/256", []string{"aes-cbc-essiv:sha256"}, ""},
		"a plaintext segment":              {" crypt/aes-xts-plain64/512 linear//0", DefaultCiphers, "uses a linear segment"},
		"nothing reported":                 {"", DefaultCiphers, "reported no mapping"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			segs, ok := parseSegments(tc.report)
			if !ok {
				t.Fatalf("report %q not read", tc.report)
			}
			err := checkCiphers(2, segs, tc.list)
			if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "layer 2")) {
				t.Errorf("got %v, want %q", err, tc.want)
			}
		})
	}
	for _, bad := range []string{" crypt/aes xts/512", " crypt/aes-xts-plain64", " crypt/aes-xts-plain64/x", " crypt/'$(reboot)'/512"} {
		if _, ok := parseSegments(bad); ok {
			t.Errorf("report %q read", bad)
		}
	}
}

// A chain's own list may name other ciphers, never one that does not encrypt.
func TestParseCiphers(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		"aes-xts-plain64 aes-cbc-essiv:sha256": "",
		"xchacha20,aes-adiantum-plain64":       "",
		"cipher_null-ecb":                      "does not encrypt",
		"null-cbc-plain64":                     "does not encrypt",
		"aes-ecb-plain64":                      "ECB is never allowed",
		"aes-cbc-null":                         "without an IV",
		"aes-xts":                              "is not CIPHER-MODE-IV",
		"":                                     "empty cipher list",
		"aes-xts-plain64;reboot":               "is not CIPHER-MODE-IV",
	} {
		_, err := ParseCiphers(in)
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("%q: %v, want %q", in, err, want)
		}
	}
}

// After a layer opens, its qube reports what the kernel runs, in the same call; a layer
// whose cipher the chain does not allow is closed again before it is used or handed on,
// the open fails naming the layer and the cipher, and nothing stays open. The plaintext
// is mounted nosuid,nodev unless the chain says otherwise.
func TestLayersMustEncrypt(t *testing.T) {
	t.Parallel()
	for _, layer := range []int{1, 2} {
		t.Run("layer "+string(rune('0'+layer)), func(t *testing.T) {
			r := newRig(t, qubessim.R42)
			r.start(t, "work")
			c := demoChain()
			c.Hops[layer-1].Ciphers = []string{"serpent-xts-plain64"} // the demo's layers are AES
			err := r.e.Open(bg, c, OpenOptions{}, nil)
			want := "layer " + string(rune('0'+layer)) + " uses aes-xts-plain64 with a 512-bit key"
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("got %v, want %q", err, want)
			}
			if left := r.leftovers(t); len(left) != 0 {
				t.Errorf("left behind: %v", left)
			}
		})
	}
	t.Run("allowed, and the status shows it", func(t *testing.T) {
		r := newRig(t, qubessim.R42)
		r.start(t, "work")
		c := demoChain()
		if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
			t.Fatal(err)
		}
		st, err := r.e.Status(bg, c)
		if err != nil || !st.Open() {
			t.Fatalf("status %+v %v", st, err)
		}
		for _, h := range st.Hops {
			if len(h.Segments) != 1 || h.Segments[0] != (Segment{Target: "crypt", Cipher: "aes-xts-plain64", KeyBits: 512}) {
				t.Errorf("%s: segments %+v", h.VM, h.Segments)
			}
		}
		if out := string(r.Sh(t, "work", "findmnt -n -o OPTIONS /mnt/secure").Stdout); out != "rw,nosuid,nodev\n" {
			t.Errorf("the plaintext is mounted with %q", out)
		}
	})
	t.Run("other mount options", func(t *testing.T) {
		r := newRig(t, qubessim.R42)
		r.start(t, "work")
		c := demoChain()
		c.MountOptions = "noexec,noatime"
		if err := r.e.Open(bg, c, OpenOptions{}, nil); err != nil {
			t.Fatal(err)
		}
		if out := string(r.Sh(t, "work", "findmnt -n -o OPTIONS /mnt/secure").Stdout); out != "rw,noexec,noatime\n" {
			t.Errorf("the plaintext is mounted with %q", out)
		}
	})
}
