package chains

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Which ciphers a layer may use. The qube below each hop writes the header the next
// qube decrypts (the source writes the outermost), and cryptsetup has been fooled by
// forged headers before: a header that says cipher_null decrypts to its own input. So
// after each open the decrypting qube reports what the kernel runs (dmsetup table, not
// the header's claim) in the same call, refuses before it uses or hands on the layer
// unless that is allowed, and qcryptd checks the report again.

// DefaultCiphers are the ciphers a layer may use unless its chain says otherwise
// (cryptsetup's spelling): XTS with a 64-bit sector IV, and Adiantum.
var DefaultCiphers = []string{"aes-xts-plain64", "serpent-xts-plain64", "twofish-xts-plain64",
	"xchacha12,aes-adiantum-plain64", "xchacha20,aes-adiantum-plain64"}

// MinKeyBits is the smallest key a layer may use (an XTS key is two keys: 256 bits is
// AES-128-XTS).
const MinKeyBits = 256

// cipherSpecRE is cryptsetup's CIPHER-MODE-IV[:IVOPTS] with an optional second cipher
// (Adiantum's "xchacha12,aes").
var cipherSpecRE = regexp.MustCompile(`^([a-z0-9]+(?:,[a-z0-9]+)?)-([a-z0-9]+)-([a-z0-9]+(?::[a-z0-9]+)?)$`)

// ParseCiphers reads a list of allowed ciphers (space-separated, cryptsetup's spelling).
// No list may allow what never encrypts: the null cipher, ECB, a null IV.
func ParseCiphers(s string) ([]string, error) {
	list := strings.Fields(s)
	if len(list) == 0 {
		return nil, fmt.Errorf("empty cipher list")
	}
	for _, c := range list {
		m := cipherSpecRE.FindStringSubmatch(c)
		switch {
		case strings.Contains(c, "cipher_null") || m != nil && strings.Contains(m[1], "null"):
			return nil, fmt.Errorf("cipher %s does not encrypt", Quote(c))
		case m == nil:
			return nil, fmt.Errorf("cipher %s is not CIPHER-MODE-IV (as aes-xts-plain64)", Quote(c))
		case m[2] == "ecb":
			return nil, fmt.Errorf("cipher %s: ECB is never allowed", Quote(c))
		case m[3] == "null":
			return nil, fmt.Errorf("cipher %s: a layer without an IV is never allowed", Quote(c))
		}
	}
	return list, nil
}

// capiRE is the kernel crypto API's spelling in a dm-crypt table: capi:MODE(CIPHER)-IV.
var capiRE = regexp.MustCompile(`^capi:([a-z0-9]+)\(([a-z0-9]+(?:,[a-z0-9]+)?)\)-(.+)$`)

// cryptsetupSpelling turns the kernel's spelling of a cipher into cryptsetup's, which
// the lists use ("capi:adiantum(xchacha12,aes)-plain64" is "xchacha12,aes-adiantum-plain64").
func cryptsetupSpelling(kernel string) string {
	if m := capiRE.FindStringSubmatch(kernel); m != nil {
		return m[2] + "-" + m[1] + "-" + m[3]
	}
	return kernel
}

// kernelSpellings lists every way the kernel may write the ciphers of a list, for the
// check in the decrypting qube.
func kernelSpellings(list []string) []string {
	var out []string
	for _, c := range list {
		out = append(out, c)
		if m := cipherSpecRE.FindStringSubmatch(c); m != nil {
			out = append(out, "capi:"+m[2]+"("+m[1]+")-"+m[3])
		}
	}
	return out
}

// Segment is one segment of a layer's mapping as the kernel runs it.
type Segment struct {
	Target  string `json:"target"`   // the device-mapper target: crypt for a layer that decrypts
	Cipher  string `json:"cipher"`   // cryptsetup's spelling ("" unless crypt)
	KeyBits int    `json:"key_bits"` // the key's size
}

func (s Segment) String() string {
	if s.Target != "crypt" {
		return "a " + s.Target + " segment"
	}
	return fmt.Sprintf("%s with a %d-bit key", s.Cipher, s.KeyBits)
}

// checkCiphers refuses a layer unless every segment of it decrypts with a cipher of the
// list and a key of at least MinKeyBits.
func checkCiphers(layer int, got []Segment, list []string) error {
	if len(got) == 0 {
		return fmt.Errorf("%w: layer %d: the qube reported no mapping", ErrCipherRefused, layer)
	}
	for _, s := range got {
		if s.Target != "crypt" || !slices.Contains(list, s.Cipher) || s.KeyBits < MinKeyBits {
			return fmt.Errorf("%w: layer %d uses %s; allowed: %s with keys of at least %d bits",
				ErrCipherRefused, layer, s, strings.Join(list, " "), MinKeyBits)
		}
	}
	return nil
}

// segmentRE is one segment as the scripts report it: TARGET/CIPHER/BITS, the cipher in
// the kernel's spelling.
var segmentRE = regexp.MustCompile(`^([a-z0-9_-]{1,32})/([A-Za-z0-9_:(),.+-]{0,128})/([0-9]{1,6})$`)

// parseSegment reads one reported segment strictly.
func parseSegment(s string) (Segment, bool) {
	m := segmentRE.FindStringSubmatch(s)
	if m == nil {
		return Segment{}, false
	}
	seg := Segment{Target: m[1]}
	if seg.Target == "crypt" {
		seg.Cipher = cryptsetupSpelling(m[2])
		seg.KeyBits, _ = strconv.Atoi(m[3]) // six digits at most
	}
	return seg, true
}

// segmentsScript reports the mapping "$name" as the kernel runs it (dmsetup table: not
// the header's claim) as " TARGET/CIPHER/BITS" per segment on descriptor fd. With an
// allowed list (the kernel's spellings) it sets ok=1 only when there are segments and
// every one decrypts with a cipher of the list and a key of at least MinKeyBits; with
// none (nil) it only reports. The key itself never leaves the qube: only its size
// (":SIZE:keyring:description", or hex digits).
func segmentsScript(fd int, allowed []string) string {
	var b strings.Builder
	check := allowed != nil
	if check {
		b.WriteString("ok=1\nsegs=0\n")
	}
	b.WriteString("t=$(dmsetup table -- \"$name\" 2>/dev/null) || t=\n")
	b.WriteString("while read -r _ _ tg c k _; do\n  [ -n \"$tg\" ] || continue\n")
	if check {
		b.WriteString("  segs=$((segs + 1))\n")
	}
	b.WriteString("  case $k in :*) n=${k#:}; n=${n%%:*};; *) n=$((${#k} / 2));; esac\n")
	b.WriteString("  case $n in ''|*[!0-9]*) n=0;; esac\n  bits=$((n * 8))\n")
	b.WriteString("  [ \"$tg\" = crypt ] || { c=; bits=0; }\n")
	fmt.Fprintf(&b, "  printf ' %%s/%%s/%%s' \"$tg\" \"$c\" \"$bits\" >&%d\n", fd)
	if check {
		b.WriteString("  case $c in ")
		for i, c := range allowed {
			if i > 0 {
				b.WriteString("|")
			}
			b.WriteString(q(c))
		}
		fmt.Fprintf(&b, ") [ \"$tg\" = crypt ] && [ \"$bits\" -ge %d ] || ok=0;; *) ok=0;; esac\n", MinKeyBits)
	}
	b.WriteString("done <<QCRYPT_TABLE\n$t\nQCRYPT_TABLE\n")
	if check {
		b.WriteString("[ \"$segs\" -gt 0 ] || ok=0\n")
	}
	return b.String()
}

// parseSegments reads the words segmentsScript printed; false if any is malformed or
// there are more than a layer can have.
func parseSegments(words string) ([]Segment, bool) {
	fields := strings.Fields(words)
	if len(fields) > 16 {
		return nil, false
	}
	var out []Segment
	for _, f := range fields {
		seg, ok := parseSegment(f)
		if !ok {
			return nil, false
		}
		out = append(out, seg)
	}
	return out, true
}

// ciphersOf are the ciphers hop i may use.
func (c *Chain) ciphersOf(i int) []string {
	if c.Hops[i].Ciphers != nil {
		return c.Hops[i].Ciphers
	}
	return DefaultCiphers
}
