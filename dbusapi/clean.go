package dbusapi

import (
	"strings"
	"unicode/utf8"
)

// Clean makes a string from qcryptd (and so, maybe, from a qube) safe for a terminal:
// control characters (C0, DEL, C1), bidirectional overrides and invalid UTF-8 become
// '?', line breaks and tabs a space. The client applies it to every string it
// decodes, so nothing qcryptctl prints can move the cursor, recolour or rewrite a line.
func Clean(s string) string {
	clean := true
	for _, r := range s {
		if unsafeRune(r) {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\n' || r == '\t' || r == '\r':
			b.WriteByte(' ')
		case unsafeRune(r):
			b.WriteByte('?')
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func unsafeRune(r rune) bool {
	switch {
	case r == utf8.RuneError, r < 0x20, r >= 0x7f && r < 0xa0:
		return true
	case r == 0x200e || r == 0x200f || r >= 0x202a && r <= 0x202e || r >= 0x2066 && r <= 0x2069:
		return true // bidi marks and overrides: text that reads other than it is
	}
	return false
}
