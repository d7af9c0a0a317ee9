package ctl

import (
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestJSONSchemaMatchesTypes holds the JSON schema in docs/qcryptctl.md against the
// types qcryptctl prints: every field a type has is documented, and nothing else.
func TestJSONSchemaMatchesTypes(t *testing.T) {
	doc := Markdown()
	schema := doc[strings.Index(doc, "## JSON output"):]
	for _, o := range jsonOutputs {
		t.Run(o.anchor, func(t *testing.T) {
			at := strings.Index(schema, o.anchor)
			if at < 0 {
				t.Fatalf("docs/qcryptctl.md does not describe the JSON of %s", o.anchor)
			}
			got := documentedFields(t, schema[at:])
			want := jsonFields(reflect.TypeOf(o.v))
			if !slices.Equal(got, want) {
				t.Errorf("documented fields %v, the type has %v", got, want)
			}
		})
	}
}

var (
	parenthesized = regexp.MustCompile(`\([^()]*\)`)
	fieldName     = regexp.MustCompile(`[a-z_]+`)
)

// documentedFields are the field names in the first `{...}` of s, sorted; "chain
// object..." refers to list's fields, which are checked there.
func documentedFields(t *testing.T, s string) []string {
	open := strings.Index(s, "{")
	if open < 0 {
		t.Fatal("no {...} after the anchor")
	}
	depth, end := 0, -1
	for i := open; i < len(s) && end < 0; i++ {
		switch s[i] {
		case '{':
			depth++
		case '}':
			if depth--; depth == 0 {
				end = i
			}
		}
	}
	if end < 0 {
		t.Fatal("unbalanced {...} after the anchor")
	}
	body := strings.ReplaceAll(s[open:end], "chain object...", "")
	body = parenthesized.ReplaceAllString(body, "")
	names := fieldName.FindAllString(body, -1)
	slices.Sort(names)
	return slices.Compact(names)
}

// jsonFields are the JSON names of t's fields and of the structs it holds, sorted,
// except chainJSON's inside another type.
func jsonFields(t reflect.Type) []string {
	var names []string
	var walk func(reflect.Type, bool)
	walk = func(t reflect.Type, top bool) {
		for t.Kind() == reflect.Slice || t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct || !top && t == reflect.TypeOf(chainJSON{}) {
			return
		}
		for f := range t.Fields() {
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "" || name == "-" {
				continue
			}
			names = append(names, name)
			walk(f.Type, false)
		}
	}
	walk(t, true)
	slices.Sort(names)
	return slices.Compact(names)
}
