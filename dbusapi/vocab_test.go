package dbusapi

import (
	"regexp"
	"slices"
	"strings"
	"testing"
)

// docString is the GDBus DocString of an interface's member (property or signal).
func docString(t *testing.T, iface, member string) string {
	t.Helper()
	xml := map[string]string{ChainInterface: ChainXML, JobInterface: JobXML}[iface]
	re := regexp.MustCompile(`name="` + member + `"[^>]*>(?:\s*<annotation[^>]*/>)*?\s*<annotation name="org.gtk.GDBus.DocString" value="([^"]*)"`)
	m := re.FindStringSubmatch(xml)
	if m == nil {
		t.Fatalf("%s.%s has no DocString", iface, member)
	}
	return m[1]
}

// words are the lower-case words of a text.
func words(s string) []string { return regexp.MustCompile(`[a-z][a-z-]*[a-z]`).FindAllString(s, -1) }

// The introspection documents exactly the vocabulary the code declares: a state, an
// operation or a cause added on one side only fails here.
func TestVocabularyDocumented(t *testing.T) {
	tests := []struct {
		iface, member, after string
		want                 []string
	}{
		{ChainInterface, "State", "", strs(ChainStates)},
		{JobInterface, "Operation", "", strs(JobOperations)},
		{JobInterface, "State", "", strs(JobStates)},
		{ChainInterface, "StateChanged", "one of:", strs(Causes)},
	}
	for _, tc := range tests {
		doc := docString(t, tc.iface, tc.member)
		if tc.after != "" {
			_, doc, _ = strings.Cut(doc, tc.after)
			doc, _, _ = strings.Cut(doc, ";")
		}
		got := words(doc)
		got = slices.DeleteFunc(got, func(w string) bool { return w == "or" })
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s.%s documents %v, the code declares %v", tc.iface, tc.member, got, tc.want)
		}
	}
	for _, c := range Causes {
		if CauseMeanings[c] == "" {
			t.Errorf("cause %s has no meaning", c)
		}
	}
	if len(CauseMeanings) != len(Causes) {
		t.Errorf("%d meanings for %d causes", len(CauseMeanings), len(Causes))
	}
}

func strs[S ~string](l []S) []string {
	out := make([]string, len(l))
	for i, s := range l {
		out[i] = string(s)
	}
	return out
}
