// Package man turns qcrypt's generated Markdown pages into man pages (roff), so that the
// man pages and docs/*.md come from one source. It knows the Markdown those pages use:
// headings, paragraphs, code blocks, bullets, tables and inline code.
package man

import (
	"fmt"
	"strings"
)

// Page renders markdown as the man page name(section); the first "# " heading is the
// page's title, the first paragraph its NAME line's description.
func Page(name string, section int, summary, markdown string) string {
	var b strings.Builder
	b.WriteString("'\\\" t\n") // tables: man runs tbl
	fmt.Fprintf(&b, ".TH %s %d \"\" \"qcrypt\" \"qcrypt\"\n", strings.ToUpper(escape(name)), section)
	fmt.Fprintf(&b, ".SH NAME\n%s \\- %s\n.SH DESCRIPTION\n", escape(name), escape(summary))
	lines := strings.Split(markdown, "\n")
	inCode, inTable := false, false
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		switch {
		case strings.HasPrefix(l, "```"):
			if inCode {
				b.WriteString(".EE\n")
			} else {
				b.WriteString(".EX\n")
			}
			inCode = !inCode
		case inCode:
			b.WriteString(escapeLine(l) + "\n")
		case strings.HasPrefix(l, "<!--"):
			// generator notes are for the Markdown's readers
		case strings.HasPrefix(l, "# "):
			// the title is the .TH line
		case strings.HasPrefix(l, "## ") || strings.HasPrefix(l, "### "):
			title := strings.TrimLeft(l, "# ")
			fmt.Fprintf(&b, ".SH %s\n", strings.ToUpper(inline(title)))
		case strings.HasPrefix(l, "|"):
			cells := strings.Split(strings.Trim(l, "|"), "|")
			if strings.HasPrefix(strings.TrimSpace(cells[0]), "---") {
				continue
			}
			if !inTable {
				b.WriteString(".TS\nallbox;\n" + strings.Repeat("l ", len(cells)-1) + "lx.\n")
				inTable = true
			}
			for j := range cells {
				cells[j] = "T{\n" + inline(strings.TrimSpace(cells[j])) + "\nT}"
			}
			b.WriteString(strings.Join(cells, "\t") + "\n")
			if i+1 >= len(lines) || !strings.HasPrefix(lines[i+1], "|") {
				b.WriteString(".TE\n")
				inTable = false
			}
		case strings.HasPrefix(l, "- "):
			fmt.Fprintf(&b, ".IP \\(bu 2\n%s\n", inline(l[2:]))
		case strings.TrimSpace(l) == "":
			b.WriteString(".PP\n")
		default:
			b.WriteString(inline(l) + "\n")
		}
	}
	return tidy(b.String())
}

// inline renders `code` bold and escapes the rest.
func inline(s string) string {
	parts := strings.Split(s, "`")
	for i := range parts {
		parts[i] = escape(parts[i])
		if i%2 == 1 { // code: options keep their minus signs when copied
			parts[i] = `\fB` + strings.ReplaceAll(parts[i], "-", `\-`) + `\fR`
		}
	}
	return escapeLine(strings.Join(parts, ""))
}

// escape makes text safe inside a roff line: backslashes, and other than ASCII as
// groff's \[uXXXX].
func escape(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\\':
			b.WriteString(`\e`)
		case r > 0x7e:
			fmt.Fprintf(&b, `\[u%04X]`, r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// escapeLine keeps a line from being read as a roff request.
func escapeLine(s string) string {
	if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
		return `\&` + s
	}
	return s
}

// tidy drops paragraph breaks that repeat or come before something that breaks anyway.
func tidy(s string) string {
	for _, pair := range [][2]string{{".PP\n.PP\n", ".PP\n"}, {".PP\n.SH", ".SH"}, {".PP\n.IP", ".IP"}, {".PP\n.TS", ".TS"}, {".PP\n.EX", ".EX"}} {
		for strings.Contains(s, pair[0]) {
			s = strings.ReplaceAll(s, pair[0], pair[1])
		}
	}
	return strings.TrimSuffix(s, ".PP\n")
}
